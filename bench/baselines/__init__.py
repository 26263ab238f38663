"""Baselines measured in the same run as Ops-Core: bare grpc.aio and Celery + Redis."""
