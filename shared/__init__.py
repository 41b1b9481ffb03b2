"""What the api and the worker must agree on: config, Redis, keys, schemas, preprocessing."""
