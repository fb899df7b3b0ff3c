"""The pure core: a run's identity (``spec``), its name (``naming``, ``patterns``,
``seed_policy``), its tags (``tags``, ``tag_keys``), MLflow's key and value rules
(``limits``), ``fingerprint``, the platform and environment variables, and redaction.

No I/O beyond reading a policy file, no threads, no mlflow. May import only
``trainkit_tracking.errors`` and ``_version``.
"""
