"""The PostgreSQL backend: several Ops-Core replicas on one database.

migrations/000N_*.sql   the schema, numbered (same discipline as SQLite's)
migrate.py              applies them, safely when replicas start at once
rows.py statements.py   its row forms; the statements built from the column lists
pool.py                 connections from a postgresql:// URL, and a LISTEN helper
"""
