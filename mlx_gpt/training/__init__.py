"""Training, in the order a run goes: ``config`` (the settings, resolved once), ``step`` (the
compiled step and evaluation), ``run`` (setting a run up or resuming it, and saving it),
``loop`` (the loop that steps, reports and saves). ``mlx_gpt.train`` is its command line."""
