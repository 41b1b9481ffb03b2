"""Long-lived workers: load the model once, pull jobs off Redis in micro-batches, write results via RQ.

Kept import-light (no torch here) so `rq worker -w worker.batch_worker.BatchWorker` and the api can
import names from this package without loading the model stack.
"""
