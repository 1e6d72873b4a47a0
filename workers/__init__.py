"""Worker side: the Celery task that runs jobs, the runtime around it, data, models, methods and reports."""
