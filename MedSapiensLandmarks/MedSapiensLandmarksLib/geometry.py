"""Plane geometry of cephalometric measurements, vectorised over leading axes.

Points are ``(..., 2)`` arrays in millimetres with y pointing down, on a radiograph facing
right (`facing_right` mirrors one facing left), so that "anterior" is +x.
"""
from __future__ import annotations

import numpy as np


def facing_right(p: np.ndarray, back: int, front: int) -> np.ndarray:
    """Mirror configurations (..., K, 2) whose ``front`` point lies left of their ``back`` one."""
    p = np.array(p, dtype=np.float64)
    left = p[..., front, 0] < p[..., back, 0]
    p[..., 0] = np.where(left[..., None], -p[..., 0], p[..., 0])
    return p


def between(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unsigned angle between vectors, degrees."""
    cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def angle_at(p: np.ndarray, vertex: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Unsigned angle p-vertex-q, degrees."""
    return between(p - vertex, q - vertex)


def lines(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Acute angle between two lines of directions u and v, degrees."""
    a = between(u, v)
    return np.minimum(a, 180.0 - a)


def signed(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle from u to v, degrees, counter-clockwise positive as seen on the image."""
    cross = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]  # image y points down: flip the sign
    return -np.degrees(np.arctan2(cross, (u * v).sum(-1)))


def ahead_of_line(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Perpendicular distance of p from the line a-b, positive when p lies anterior (+x side)."""
    d = b - a
    normal = np.stack([d[..., 1], -d[..., 0]], axis=-1) / np.linalg.norm(d, axis=-1, keepdims=True)
    normal = normal * np.where(normal[..., :1] < 0, -1.0, 1.0)  # the normal that points forward
    return ((p - a) * normal).sum(-1)


def distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p - q, axis=-1)
