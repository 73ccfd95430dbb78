"""Shared test setup: one intra-op thread (the CI machine has 2 busy cores; more threads only contend)."""
import torch

torch.set_num_threads(1)
