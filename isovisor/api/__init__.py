"""The management API: REST over mutual TLS 1.3, FastAPI + uvicorn, RBAC on every route."""
