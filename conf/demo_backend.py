"""Demo backend for `make run`: answers HTTP requests with a line naming its
port (so curl through ringd shows which backend served it) and echoes any
other bytes back (so nc works too). Listens on 127.0.0.1 only."""
import asyncio
import sys


async def serve(port: int) -> asyncio.AbstractServer:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(65536)
            if first[:4] in (b"GET ", b"HEAD", b"POST", b"PUT "):
                body = f"hello from demo backend 127.0.0.1:{port}\n".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
                await writer.drain()
                return
            data = first
            while data:
                writer.write(data)
                await writer.drain()
                data = await reader.read(65536)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, "127.0.0.1", port, reuse_address=True)


async def main(ports: list[int]) -> None:
    servers = [await serve(p) for p in ports]
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    try:
        asyncio.run(main([int(p) for p in sys.argv[1:]] or [8081, 8082]))
    except KeyboardInterrupt:
        pass
