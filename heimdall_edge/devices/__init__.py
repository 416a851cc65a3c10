"""Hardware seams: each device is a Protocol with a real and a simulated implementation."""
