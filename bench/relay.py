#!/usr/bin/env python3
"""A TCP relay that adds a fixed delay to each direction without reducing the bandwidth.

This kernel has no netem, so the harness runs this in the source namespace: the source
dials --listen, the relay dials --to over the (tc-shaped) veth and forwards both ways.
Each chunk read is held until D ms after it arrived, then written, while later chunks keep
arriving: the delay is added once per direction, and throughput is what the link allows.
At most --max-buffer bytes wait per direction (a bandwidth-delay product and some); past
that the relay stops reading, so the sender is held back by TCP as on a real link.
Any number of connections (QEMU's multifd opens several). Prints `listening` when ready.

Usage: relay.py --listen HOST:PORT --to HOST:PORT --delay-ms D [--max-buffer BYTES]
"""
import argparse
import asyncio
import time

CHUNK = 256 * 1024


def split(hostport):
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


async def forward(reader, writer, delay, cap):
    """Copies reader to writer, each chunk delayed by `delay` seconds from its arrival."""
    queue = asyncio.Queue()
    room = asyncio.Condition()
    held = 0

    async def take():
        nonlocal held
        while True:
            data = await reader.read(CHUNK)
            async with room:
                await room.wait_for(lambda: held < cap)
                held += len(data)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def give():
        nonlocal held
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            async with room:
                held -= len(data)
                room.notify_all()

    await asyncio.gather(take(), give())


async def serve(args):
    to_host, to_port = split(args.to)
    delay = args.delay_ms / 1000

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(to_host, to_port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(forward(client_r, server_w, delay, args.max_buffer),
                                 forward(server_r, client_w, delay, args.max_buffer))
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (client_w, server_w):
                w.close()

    host, port = split(args.listen)
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--max-buffer", type=int, default=16 << 20)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
