"""The server spine: app factory, auth and roles, device routes, problems, metrics, logs."""
