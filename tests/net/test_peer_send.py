"""A peer connection's queues: when the consensus frames queued so far have been sent."""

import trio
import trio_websocket

from ehrnode.net.peers import Peer


async def test_urgent_sent_returns_once_the_queued_consensus_frames_are_written_and_not_before():
    accepted, receive = trio.open_memory_channel(1)

    async def handler(request):
        await accepted.send(await request.accept())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        async with trio_websocket.open_websocket("127.0.0.1", server.port, "/", use_ssl=False) as client:
            peer = Peer("B", await receive.receive(), dialed=False)
            with trio.fail_after(1):
                await peer.urgent_sent()  # nothing queued: at once
            assert peer.send(b"vote")
            assert peer.send(b"gossip", bulk=True)
            with trio.move_on_after(0.1) as waited:
                await peer.urgent_sent()
            assert waited.cancelled_caught  # no writer yet: the vote is still queued
            async with trio.open_nursery() as inner:
                inner.start_soon(peer.writer)
                with trio.fail_after(5):
                    await peer.urgent_sent()
                    assert await client.get_message() == b"vote"
                    assert await client.get_message() == b"gossip"
                await peer.close(1000, "done", wait=1.0)
                inner.cancel_scope.cancel()
            assert not peer.send(b"after the close")
            with trio.fail_after(1):
                await peer.urgent_sent()  # a closed connection holds nobody up
        nursery.cancel_scope.cancel()
