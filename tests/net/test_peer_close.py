"""Closing a peer while its writer is sending: the other side still learns the close code."""

import trio
import trio_websocket

from ehrnode.net.peers import CLOSE_PROTOCOL, Peer

FRAME = b"\x07" * (1024 * 1024)


async def test_a_close_while_frames_are_being_sent_reaches_the_other_side_with_its_code():
    accepted, receive = trio.open_memory_channel(1)

    async def handler(request):
        ws = await request.accept()
        await accepted.send(ws)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        port = server.port
        async with trio_websocket.open_websocket("127.0.0.1", port, "/", use_ssl=False,
                                                 max_message_size=64 * 1024 * 1024) as client:
            ws = await receive.receive()
            peer = Peer("B", ws, dialed=False)
            for _ in range(8):  # more than the socket buffers hold while the client is not reading
                assert peer.send(FRAME)
            async with trio.open_nursery() as inner:
                inner.start_soon(peer.writer)
                await trio.sleep(0.2)  # the writer is inside a send, waiting for the client to read

                async def read_until_closed():
                    try:
                        while True:
                            await client.get_message()
                    except trio_websocket.ConnectionClosed as exc:
                        codes.append(exc.reason.code)

                codes: list[int] = []
                inner.start_soon(read_until_closed)
                await peer.close(CLOSE_PROTOCOL, "bad frame", wait=5.0)
                with trio.fail_after(5):
                    while not codes:
                        await trio.sleep(0.01)
                inner.cancel_scope.cancel()
            assert codes == [CLOSE_PROTOCOL]
        nursery.cancel_scope.cancel()


class _ResetWhileClosing:
    """A connection whose close fails the way a reset stream's may: the transport is already
    closed under it."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.closes = 0

    async def aclose(self, code=1000, reason=None):
        self.closes += 1
        await trio.lowlevel.checkpoint()
        raise self.error


async def test_closing_a_connection_that_breaks_meanwhile_is_no_error_of_the_node():
    for error in (trio.ClosedResourceError("another task closed this socket"), trio.BrokenResourceError(),
                  trio.BusyResourceError(), ConnectionResetError()):
        ws = _ResetWhileClosing(error)
        peer = Peer("B", ws, dialed=True)  # type: ignore[arg-type]
        await peer.close(CLOSE_PROTOCOL, "bad frame")
        assert ws.closes == 1
        assert not peer.send(b"after the close")  # nothing more is queued for it
