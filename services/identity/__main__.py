"""Run the identity service: `python -m services.identity` or `onecdp-identity`."""

from services.identity.server import DEFINITION
from shared.runner import main as run


def main() -> None:
    run(DEFINITION)


if __name__ == "__main__":
    main()
