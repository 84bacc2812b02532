"""The GPU backend server.

One concern per module:

* `server`   — the ROUTER network loop: handshake, requests, events, ownership;
* `jobqueue` — the bounded queue, round-robin fair across client ids;
* `worker`   — the single GPU worker thread (engine call, PNG encoding, persistence);
* `store`    — SQLite job table + PNG frame files, crash recovery, retention;
* `limits`   — request checks against the configured `Limits`, with field paths;
* `config`   — `ServerConfig`, the bind-address policy, the HMAC key bootstrap;
* `images`   — PNG encoding of frames and previews;
* `jobs`     — the live `Job` and the worker -> loop events;
* `pool`     — a thread pool of daemon threads, which a shutdown can leave behind.

Embedding (tests, demos)::

    server = Server(ServerConfig(key=key, data_dir=path, bind="tcp://127.0.0.1:*"), FakeEngine())
    endpoint = server.start()   # background thread; returns the bound address
    ...
    server.stop()

`animatediff-blender serve` runs `Server.serve_forever()` on the main thread instead.
"""
