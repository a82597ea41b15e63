"""Decode side: the continuous-batching scheduler, preemption, and the single-instance
(colocated) engine that also prefills."""
