"""The profile service: see its API in protos/onecdp/profile/v1/."""
