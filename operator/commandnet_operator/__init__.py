"""The commandnet Kubernetes operator: ``Agent`` resources in, trigger commands out, status back.

It talks to NATS only (publish-only on the work stream; it watches the status and graph
buckets), never to the store and never to the graph's code.
"""
