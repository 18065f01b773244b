"""The runtime: the one pool of loaded model instances, and the leases requests and Lab jobs hold."""
from server.runtime.instance import LAB, SERVE, Instance, Lease, Overlay
from server.runtime.pool import AdapterFactory, ModelPool, OverlayResolver, PoolConfig

__all__ = ["LAB", "SERVE", "Instance", "Lease", "Overlay", "AdapterFactory", "ModelPool", "OverlayResolver",
           "PoolConfig"]
