"""The store: the one door to MLflow. ``store.Store`` (MlflowClient with explicit run ids)
over ``bounded_client`` (deadlines, retries, error classification), MLflow's own SQL tables
(``sql_tables``), claims and run-name versions (``claims``, ``versions``), and everything
Azure ML (``azure``).

The only room that imports mlflow (lazily, inside functions). May import ``_process``,
``_core`` and ``errors``.
"""
