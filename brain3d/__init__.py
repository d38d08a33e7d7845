"""brain3d: config-driven training of 3D CNNs on brain MRI."""
