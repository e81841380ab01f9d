"""Example tasks and configs (a regular package: a site-packages package named ``examples``, which some wheels
ship, would otherwise shadow this folder)."""
