"""nn.Modules only, one architecture per file, behind ``build_network``. Imports nothing else of ours."""
