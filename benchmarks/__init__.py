"""Side-by-side timings of torchkeep against torch.save/torch.load and safetensors."""
