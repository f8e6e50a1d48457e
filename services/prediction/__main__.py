"""Run the prediction service: `python -m services.prediction` or `onecdp-prediction`."""

from services.prediction.server import DEFINITION
from shared.runner import main as run


def main() -> None:
    run(DEFINITION)


if __name__ == "__main__":
    main()
