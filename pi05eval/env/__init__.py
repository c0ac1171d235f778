"""LIBERO adapter: suites and tasks, openpi's episode protocol, observation extraction, env worker processes."""
