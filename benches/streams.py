# Concurrent SSE streams with timestamps carried in the events.
#   backend PORT EVENTS INTERVAL_MS      an OpenAI-style streaming server: EVENTS chunks per
#                                        answer, INTERVAL_MS apart, each carrying its send time
#   client HOST PORT STREAMS EVENTS      STREAMS answers at once; prints
#                                        "events errors delay_p50_ms delay_p99_ms peak_open"
# Delay: CLOCK_MONOTONIC at arrival minus the time the backend wrote into the event (one clock
# for both processes on one machine).
import asyncio, json, random, sys, time

async def backend(port, events, interval):
    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
                for k in range(events):
                    data = b'data: {"t":%d,"k":%d,"choices":[{"delta":{"content":"tok"}}]}\n\n' % (time.monotonic_ns(), k)
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    await asyncio.sleep(interval / 1000)
                done = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=16384)
    async with server:
        await server.serve_forever()

async def client(host, port, streams, events, spread):
    delays, errors, got = [], [0], [0]
    open_now, peak = [0], [0]
    body = b'{"model":"chat","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s") % (host.encode(), len(body), body)
    async def one():
        await asyncio.sleep(random.random() * spread)
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            errors[0] += 1
            return
        open_now[0] += 1
        peak[0] = max(peak[0], open_now[0])
        seen, done = 0, False
        try:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n")[0]:
                raise ValueError(head[:80])
            while not done:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunk = await reader.readexactly(size + 2)
                now = time.monotonic_ns()
                for event in chunk[:-2].split(b"\n\n"):
                    if not event.startswith(b"data: "):
                        continue
                    if event == b"data: [DONE]":
                        done = True
                        continue
                    e = json.loads(event[6:])
                    if e["k"] != seen:
                        raise ValueError(f"event {e['k']} where {seen} was due")
                    seen += 1
                    delays.append((now - e["t"]) / 1e6)
            if seen != events or not done:
                raise ValueError(f"{seen}/{events} events, done={done}")
            got[0] += seen
        except (ValueError, OSError, asyncio.IncompleteReadError):
            errors[0] += 1
        finally:
            open_now[0] -= 1
            writer.close()
    await asyncio.gather(*(one() for _ in range(streams)))
    delays.sort()
    q = lambda p: delays[min(len(delays) - 1, int(len(delays) * p))] if delays else float("nan")
    print(f"{got[0]} {errors[0]} {q(0.5):.3f} {q(0.99):.3f} {peak[0]}")

if sys.argv[1] == "backend":
    asyncio.run(backend(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
else:
    asyncio.run(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                       float(sys.argv[6]) if len(sys.argv) > 6 else 1.0))
