"""The segmentation service: see its API in protos/onecdp/segmentation/v1/."""
