"""llaunch: plan, launch and resume language-model training."""

__version__ = "0.1.0"
