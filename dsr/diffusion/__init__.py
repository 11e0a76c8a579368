"""Flow matching: the transport (noising and loss), ODE / SDE samplers and classifier-free guidance."""
