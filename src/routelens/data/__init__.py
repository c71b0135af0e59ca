"""Data in: trajectories (and, later, reasoning tasks and their verifiers)."""

from routelens.data.trajectories import Trajectory, load_trajectories

__all__ = ["Trajectory", "load_trajectories"]
