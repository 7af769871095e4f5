"""EmProps: the platform whose generations run here, told exactly once how each ended.

`client` talks to EmProps (one module, its own error rules); `notifications` keeps what
EmProps must hear in PostgreSQL (a row per EmProps workflow, written with the workflow);
`process` is the `emprops` process: it follows `emp:events` with a consumer group of its
own, turns a workflow's terminal event into that row's body, and sends it until EmProps
answers 2xx.
"""
