"""The prediction service: see its API in protos/onecdp/prediction/v1/."""
