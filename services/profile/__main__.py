"""Run the profile service: `python -m services.profile` or `onecdp-profile`."""

from services.profile.server import DEFINITION
from shared.runner import main as run


def main() -> None:
    run(DEFINITION)


if __name__ == "__main__":
    main()
