"""The hot path: one proxied call, from the client's request to the backend and back.

Modules: ``backends`` (the replicas of each model, health, opening an upstream call with failover), ``routing``
(which replica: least in flight over a snapshot), ``resilience`` (circuit breaker, retry budget), ``h1`` and
``h1_conn`` (the HTTP/1.1 client and its keep-alive pool), ``proxy`` (``RelayResponse``, and ``Recorder``, what a
finished call leaves in the metrics, the key's limits and the store), ``sse`` (framing and timing the stream),
``asgi`` (send and disconnect helpers). The relay knows no routes and nothing of comparison.

One streaming call (``POST /v1/chat/completions``, ``"stream": true``):

1. ``middleware``: ``StampArrival`` takes t0 (every latency counts from here), ``Guard`` checks the head and the
   key, ``BodyLimit`` the size, ``FastPath`` hands the call to ``api.openai.proxy`` before FastAPI's router.
2. ``proxy`` reads and parses the body (``protocol``: limits first, then validation), resolves the model, admits
   the call against the key's limits, maybe samples it for mirroring, and starts one ``asgi.ClientWatch``: from
   here a client that leaves cancels the call, which closes the upstream connection, and vLLM aborts.
3. ``BackendPool.open`` picks a replica and sends the request on a pooled connection (``h1.Pool``). For a stream
   it also reads the first chunk before anything goes to the client: until then a failure, a 5xx or a late first
   token can still move to another replica. The first chunk is the one thing held back; after it nothing is.
4. ``RelayResponse`` sends the response head, then the first chunk, then relays. Each upstream read is offered
   first to ``RelayResponse._inline`` from the connection's own ``data_received`` (``h1_conn.Response.offer``):
   one plain token event is timed (``sse.StreamObserver.observe_plain``) and sent to the client right there
   (``asgi.send_now``), with no task switch. Everything else (the first chunk, part of an event or several,
   usage, errors, ``[DONE]``) is handled by the relay task, in arrival order.
5. ``[DONE]`` ends the client's response in the same write; the task then reads the backend's last bytes so the
   connection can be reused. An error after the first byte is an SSE error event, then ``data: [DONE]``.
6. Whatever happened: the upstream response is closed (an unfinished one with its connection), the backend slot
   and the in-flight gauge are released, and ``Recorder.finished`` records the call exactly once.

Ordering rules of the inline path (step 4), which keep the bytes in order and each call in its own context:

- ``_inline`` is offered bytes only while the relay task waits in ``Upstream.read`` with nothing buffered, so it
  never runs between two of the task's own sends;
- a send that cannot finish at once (the client's socket is full) continues as a task, held in ``_sending``;
  until it is done ``_inline`` refuses new bytes (they are buffered for the task), and the task awaits it
  before its next send;
- the send runs in the call's own ``contextvars`` context, captured when the relay starts, not in the context of
  whichever call opened the pooled connection (its callbacks' context): a logging or tracing middleware sees
  the right request;
- ``gateway.relay_inline: false`` turns the inline path off: every read then goes through the task (about a
  fifth more CPU per chunk; same bytes, same timings' definitions).
"""
