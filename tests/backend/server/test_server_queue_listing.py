"""`list_jobs`: the queue as every client sharing the backend sees it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from server_helpers import RawPeer, small_request, wait_for

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.server import MAX_CLIENT_NAME, Server
from animatediff_blender.protocol import messages
from animatediff_blender.protocol.client import BackendClient, ClientError

pytestmark = pytest.mark.timeout(60)

ClientFactory = Callable[..., BackendClient]


@pytest.fixture
def slow(make_server: Callable[..., Server]) -> Server:
    return make_server(engine=FakeEngine(step_delay_s=0.05))


def test_the_listing_shows_the_fair_order_and_hides_other_clients_jobs(
    slow: Server, make_client: ClientFactory
) -> None:
    anna = make_client(slow, client_id="anna", client_name="blender 4.5.15 anna@ws-12")
    bob = make_client(slow, client_id="bob", client_name="animatediff-blender generate bob@ws-3")
    on_gpu = anna.submit(small_request(steps=100), client_tag="shot 10")
    wait_for(anna, on_gpu.job_id, (messages.Progress,))
    anna_2 = anna.submit(small_request(prompt="second", frames=8, steps=100), client_tag="shot 20")
    anna_3 = anna.submit(small_request(prompt="third"))
    bob_1 = bob.submit(small_request(prompt="bob's", width=64, height=48))

    seen_by_bob = bob.list_jobs()
    # Round-robin: bob's one job runs before anna's third, though it came later.
    assert [(j.position, j.state, j.client) for j in seen_by_bob.jobs] == [
        (0, "running", "blender 4.5.15 anna@ws-12"),
        (1, "queued", "blender 4.5.15 anna@ws-12"),
        (2, "queued", "animatediff-blender generate bob@ws-3"),
        (3, "queued", "blender 4.5.15 anna@ws-12"),
    ]
    assert seen_by_bob.clients == 2
    assert [j.mine for j in seen_by_bob.jobs] == [False, False, True, False]
    # Others' jobs: no id, no tag (nor anything of their prompt); one's own: both.
    assert all(j.job_id == "" and j.client_tag == "" for j in seen_by_bob.jobs if not j.mine)
    assert seen_by_bob.jobs[2].job_id == bob_1.job_id
    assert (seen_by_bob.jobs[2].width, seen_by_bob.jobs[2].height) == (64, 48)
    assert seen_by_bob.jobs[1].frames == 8
    running = seen_by_bob.jobs[0]
    assert running.total_steps == 100 and 0 < running.step < 100 and running.started_at > 0

    seen_by_anna = anna.list_jobs()
    assert [j.job_id for j in seen_by_anna.jobs if j.mine] == [on_gpu.job_id, anna_2.job_id, anna_3.job_id]
    assert [j.client_tag for j in seen_by_anna.jobs if j.mine] == ["shot 10", "shot 20", ""]

    # The job on the GPU cancelled: the next in line runs, the rest move up.
    anna.cancel(on_gpu.job_id)
    wait_for(anna, anna_2.job_id, (messages.Progress,))
    after = anna.list_jobs()
    assert [(j.position, j.state, j.job_id) for j in after.jobs] == [
        (0, "running", anna_2.job_id), (1, "queued", ""), (2, "queued", anna_3.job_id)
    ]
    assert after.jobs[1].client == "animatediff-blender generate bob@ws-3"


def test_an_empty_queue_lists_nothing(server: Server, client: BackendClient) -> None:
    listing = client.list_jobs()
    assert listing.jobs == [] and listing.clients == 0


def test_client_names_are_shown_as_one_short_printable_line(slow: Server, make_client: ClientFactory) -> None:
    odd = make_client(slow, client_id="odd", client_name="evil\n\x1b[31mred\x00 " + "x" * 5000)
    nameless = make_client(slow, client_id="nameless-client-7", client_name="")
    odd.submit(small_request(steps=100))
    nameless.submit(small_request())
    jobs = odd.list_jobs().jobs
    shown = jobs[0].client
    assert shown.startswith("evil [31mred ") and len(shown) <= MAX_CLIENT_NAME
    assert shown.isprintable()
    assert jobs[1].client == "client nameless"  # no name given: the start of its id


def test_a_job_keeps_the_name_its_client_had_when_it_submitted(slow: Server, make_client: ClientFactory) -> None:
    """The command line's programs share one client id per user@host (so that `generate
    --resume` finds a job from another process): a `queue` run after a `generate` said
    hello as `queue`, and the listing named the generate's job after it."""
    generating = make_client(slow, client_id="cli-anna", client_name="animatediff-blender generate anna@ws")
    job = generating.submit(small_request(steps=100))
    asking = make_client(slow, client_id="cli-anna", client_name="animatediff-blender queue anna@ws")
    asking.connect()
    later = asking.submit(small_request())
    listing = asking.list_jobs()
    assert [(j.job_id, j.client, j.mine) for j in listing.jobs] == [
        (job.job_id, "animatediff-blender generate anna@ws", True),
        (later.job_id, "animatediff-blender queue anna@ws", True),
    ]


def test_a_malformed_list_jobs_is_refused_and_the_server_goes_on(server: Server, client: BackendClient) -> None:
    with RawPeer(server.endpoint) as peer:
        peer.send(peer.sign_raw(peer.header_bytes("list_jobs"), b"{}", b'{"surprise": [1, 2]}'))
        reply = peer.recv()
        assert isinstance(reply.content, messages.JobList)  # unknown fields are ignored (minor versions add them)
        peer.send(peer.sign_raw(peer.header_bytes("list_jobs"), b"{}", b"[]"))
        assert peer.recv_error().code == "bad_message"
    assert client.list_jobs().jobs == []


def test_a_backend_older_than_protocol_1_2_is_named_not_asked(server: Server, client: BackendClient) -> None:
    assert client.welcome is not None
    client.welcome = messages.Welcome(**{**{f: getattr(client.welcome, f) for f in client.welcome.__struct_fields__},
                                         "protocol_version": "1.1", "server_version": "0.9.0"})  # fmt: skip
    with pytest.raises(ClientError) as err:
        client.list_jobs()
    assert err.value.code == "unsupported"
    assert "server 0.9.0, protocol 1.1" in err.value.message and "update it" in err.value.message
