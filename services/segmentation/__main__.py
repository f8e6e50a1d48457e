"""Run the segmentation service: `python -m services.segmentation` or `onecdp-segmentation`."""

from services.segmentation.server import DEFINITION
from shared.runner import main as run


def main() -> None:
    run(DEFINITION)


if __name__ == "__main__":
    main()
