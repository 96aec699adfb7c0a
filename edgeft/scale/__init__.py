"""Scale-out on existing engines: Ray Serve (ray_serve, ray_app), a Triton model repository (triton) and
Kubernetes manifests (kubernetes). Each writes its files into the bundle at ship time and checks them
offline for ``edgeft verify``; none of them manages processes, balances load or scales by itself."""
