"""Thin Litestar controllers: decode, ask the router and the serving layer, encode."""
