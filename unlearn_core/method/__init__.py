"""The unlearning method: its options, the objectives, timestep weighting, gradient surgery, the
training loop and verified stopping."""
