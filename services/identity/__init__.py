"""The identity service: see its API in protos/onecdp/identity/v1/."""
