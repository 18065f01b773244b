"""Durable state the server keeps between requests (SQLite files under the lab directory)."""
