"""The chat window against a stub node agent (a real unix-socket server speaking the local API) and a real
chat endpoint on loopback: the peer list follows the agent, sends succeed or fail visibly, incoming messages
are marked unread, and history survives a restart."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("PySide6", reason="the chat GUI needs PySide6 (pip install meshvpn[chat])")

from PySide6.QtCore import Qt  # noqa: E402

from desktop_chat.agentstub import StubAgent  # noqa: E402
from desktop_chat.framing import ChatMessage  # noqa: E402
from desktop_chat.history import MemoryHistory, Record, SqliteHistory  # noqa: E402
from desktop_chat.peers import AgentPeerSource, MemoryPeerSource, PeerDirectory, static_status  # noqa: E402
from desktop_chat.session import ChatSession  # noqa: E402
from desktop_chat.transport import ListenError, send_message  # noqa: E402
from desktop_chat.window import PRESENCE_ROLE, ChatWindow  # noqa: E402
from meshcontract.localapi import AgentStatus, PeerView  # noqa: E402

pytestmark = pytest.mark.gui

ME, BOB, CAROL, DAVE = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
WAIT_MS = 5000


def peer(ip: str, name: str, *, state: str = "active", handshake_age: float | None = 5.0) -> PeerView:
    return PeerView(node_id=name.lower(), name=name, mesh_ip=ip, public_key="k", state=state, configured=True,
                    latest_handshake=None if handshake_age is None else time.time() - handshake_age)


def status(peers: list[PeerView], *, control_plane: bool = True) -> AgentStatus:
    return AgentStatus(node_id="alice", name="alice", mesh_ip=ME, prefix_len=16, interface="mc0",
                       broker_connected=control_plane, registrar_online=control_plane, membership_revision=1,
                       membership_complete=True, peers=peers, now=time.time())


class Node:
    """Everything a window test needs: the stub agent, Bob's real endpoint, and a way to open windows."""

    def __init__(self, tmp_path: Path, qtbot) -> None:
        self.tmp_path = tmp_path
        self.qtbot = qtbot
        self.agent = StubAgent(tmp_path / "agent.sock", status([peer(BOB, "bob"), peer(CAROL, "carol", handshake_age=None)]))
        self.agent.start()
        self.windows: list[ChatWindow] = []
        self._reservation: socket.socket | None = None
        try:
            self.bob = self._bob()
        except BaseException:
            self.agent.stop()
            raise

    def _bob(self) -> ChatSession:
        for _ in range(20):
            # Every window listens on ME at Bob's port, once its first agent poll is in: a socket bound there (never
            # listening) keeps any other program from taking the port meanwhile, and still lets a window's listener
            # in, since both set SO_REUSEADDR. Probing and closing would leave the port free for anyone until then.
            reservation = socket.socket()
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reservation.bind((ME, 0))
            port = reservation.getsockname()[1]
            directory = PeerDirectory()
            directory.update(MemoryPeerSource(static_status(self_ip=BOB, name="bob", member_ips=[ME],
                                                            now=time.time())).snapshot(now=time.time()))
            bob = ChatSession(history=MemoryHistory(), directory=directory, port=port, timeout=2.0, name="bob")
            try:
                bob.ensure_listening()
            except ListenError:
                reservation.close()
                continue
            self._reservation = reservation
            return bob
        raise AssertionError("no port free on both 127.0.0.2 and 127.0.0.3")

    def open(self, history=None) -> ChatWindow:
        session = ChatSession(history=history or MemoryHistory(), directory=PeerDirectory(), port=self.bob.port,
                              timeout=1.0)
        window = ChatWindow(session=session, source=AgentPeerSource(self.agent.socket_path), poll_interval=0.1)
        self.qtbot.addWidget(window)
        window.show()
        window.start()
        self.windows.append(window)
        self.qtbot.waitUntil(lambda: session.listening is not None, timeout=WAIT_MS)
        self.qtbot.waitUntil(lambda: window.peer_ips() != [], timeout=WAIT_MS)
        return window

    def close(self) -> None:
        for window in self.windows:
            window.close()
        self.bob.close(wait=1)
        self.agent.stop()
        if self._reservation is not None:
            self._reservation.close()


@pytest.fixture
def node(tmp_path, qtbot):
    n = Node(tmp_path, qtbot)
    try:
        yield n
    finally:
        n.close()


def presences(window: ChatWindow) -> dict[str, str]:
    return {ip: window.peer_item(ip).data(PRESENCE_ROLE) for ip in window.peer_ips()}


def item_text(window: ChatWindow, row: int = -1) -> str:
    count = window.conversation.count()
    return window.conversation.item(count + row if row < 0 else row).text() if count else ""


def test_peer_list_follows_the_agent(node, qtbot):
    window = node.open()
    assert window.peer_ips() == [BOB, CAROL]
    assert presences(window) == {BOB: "online", CAROL: "idle"}
    assert window.peer_item(BOB).text() == f"bob\n{BOB}"

    node.agent.set_status(status([peer(BOB, "bob"), peer(CAROL, "carol", state="unreachable"), peer(DAVE, "dave")]))
    qtbot.waitUntil(lambda: presences(window) == {BOB: "online", CAROL: "offline", DAVE: "online"}, timeout=WAIT_MS)

    window.select_peer(CAROL)
    assert node.bob.send_now(ME, "unread until bob is opened").status == "delivered"
    qtbot.waitUntil(lambda: window.unread(BOB) == 1, timeout=WAIT_MS)
    node.agent.set_status(status([peer(BOB, "bob", handshake_age=600), peer(DAVE, "dave")]))
    qtbot.waitUntil(lambda: presences(window) == {BOB: "idle", DAVE: "online"}, timeout=WAIT_MS)
    assert window.peer_ips() == [BOB, DAVE]
    # Carol left while her conversation was open: it stays open, marked, and no other peer got opened.
    assert "not a mesh member now" in window.conversation_title.text()
    assert window.peer_list.selectedItems() == []
    assert window.unread(BOB) == 1

    node.agent.set_status(status([peer(BOB, "bob"), peer(CAROL, "carol"), peer(DAVE, "dave")]))
    qtbot.waitUntil(lambda: presences(window).get(CAROL) == "online", timeout=WAIT_MS)
    assert window.peer_list.selectedItems() == [window.peer_item(CAROL)]  # back, and still the open conversation
    assert "carol" in window.conversation_title.text()


def test_focus_on_the_peer_list_opens_no_conversation(node, qtbot):
    """Qt makes the first peer current when the list gets focus, as when the window is activated after the
    peers arrived; only a selection opens a conversation (and marks it read)."""
    history = MemoryHistory()
    history.add(Record(BOB, uuid.uuid4().hex, "in", "bob", "unread", time.time(), "received", read=False))
    window = node.open(history)
    qtbot.waitUntil(lambda: "1 new" in window.peer_item(BOB).text(), timeout=WAIT_MS)
    qtbot.waitUntil(window.isActiveWindow, timeout=WAIT_MS)  # only a widget in the active window gets focus
    window.peer_list.clearFocus()
    window.peer_list.setFocus(Qt.FocusReason.ActiveWindowFocusReason)
    assert window.conversation_title.text() == "Select a peer to chat with"
    assert window.peer_list.selectedItems() == []
    assert "1 new" in window.peer_item(BOB).text()
    assert window.peer_list.hasFocus()
    assert window.peer_list.currentItem() is window.peer_item(BOB)  # what Qt did on focus-in

    # A click on that current but unselected peer selects it: now its conversation opens.
    rect = window.peer_list.visualItemRect(window.peer_item(BOB))
    qtbot.mouseClick(window.peer_list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert "bob" in window.conversation_title.text()
    qtbot.waitUntil(lambda: "unread" in item_text(window), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.peer_item(BOB).text() == f"bob\n{BOB}", timeout=WAIT_MS)


def test_status_bar_tells_control_plane_and_agent_trouble(node, qtbot):
    window = node.open()
    qtbot.waitUntil(lambda: "control plane online" in window.status_label.text(), timeout=WAIT_MS)
    assert f"listening on {ME}:{node.bob.port}" in window.status_label.text()
    node.agent.set_status(status([peer(BOB, "bob")], control_plane=False))
    qtbot.waitUntil(lambda: "control plane down" in window.status_label.text(), timeout=WAIT_MS)
    node.agent.stop()
    qtbot.waitUntil(lambda: "agent unreachable" in window.status_label.text(), timeout=WAIT_MS)
    assert window.peer_ips() == [BOB]  # last-known peers stay


def test_send_to_the_selected_peer_is_delivered(node, qtbot):
    window = node.open()
    window.select_peer(BOB)
    assert "bob" in window.conversation_title.text()
    qtbot.keyClicks(window.entry, "hello over the mesh")
    qtbot.keyClick(window.entry, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: "✓ delivered" in item_text(window), timeout=WAIT_MS)
    assert "hello over the mesh" in item_text(window)
    assert window.entry.text() == ""
    assert [(r.name, r.text) for r in node.bob.history.conversation(ME)] == [("alice", "hello over the mesh")]


def test_delivery_failure_is_shown_and_can_be_retried(node, qtbot):
    window = node.open()
    window.select_peer(BOB)
    node.bob.close()
    window.entry.setText("anyone home?")
    qtbot.mouseClick(window.send_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "✗ failed" in item_text(window), timeout=WAIT_MS)
    assert "connection refused" in item_text(window)
    assert not window.retry_button.isEnabled()
    window.conversation.setCurrentRow(window.conversation.count() - 1)
    assert window.retry_button.isEnabled()

    node.bob.ensure_listening()
    qtbot.mouseClick(window.retry_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "✓ delivered" in item_text(window), timeout=WAIT_MS)
    assert window.conversation.count() == 1
    assert [r.text for r in node.bob.history.conversation(ME)] == ["anyone home?"]


def test_incoming_message_appears_with_an_unread_marker(node, qtbot):
    window = node.open()
    window.select_peer(CAROL)
    assert node.bob.send_now(ME, "ping from bob").status == "delivered"
    qtbot.waitUntil(lambda: window.unread(BOB) == 1, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: "1 new" in window.peer_item(BOB).text(), timeout=WAIT_MS)
    assert window.peer_item(BOB).font().bold()

    window.select_peer(BOB)
    qtbot.waitUntil(lambda: "ping from bob" in item_text(window), timeout=WAIT_MS)  # read off the GUI thread
    assert item_text(window).startswith("bob ·")
    assert window.unread(BOB) == 0
    assert window.peer_item(BOB).text() == f"bob\n{BOB}"
    # While the conversation is open, a new message is shown read.
    assert node.bob.send_now(ME, "second").status == "delivered"
    qtbot.waitUntil(lambda: "second" in item_text(window), timeout=WAIT_MS)
    assert window.unread(BOB) == 0


def test_history_survives_a_restart(node, qtbot, tmp_path):
    db = tmp_path / "state" / "history.db"
    window = node.open(SqliteHistory(db))
    window.select_peer(BOB)
    window.entry.setText("remember me")
    window.send_current()
    qtbot.waitUntil(lambda: "✓ delivered" in item_text(window), timeout=WAIT_MS)
    window.close()
    window.session.history.close()

    again = node.open(SqliteHistory(db))
    again.select_peer(BOB)
    qtbot.waitUntil(lambda: "remember me" in item_text(again), timeout=WAIT_MS)
    assert "✓ delivered" in item_text(again)
    again.close()
    again.session.history.close()


def test_screenshot(node, qtbot, tmp_path):
    """A window with a few peers and a conversation; MESHCHAT_SCREENSHOT=PATH also saves it there."""
    node.agent.set_status(status([peer(BOB, "bob"), peer(CAROL, "carol", handshake_age=None),
                                  peer(DAVE, "dave", state="unreachable")]))
    window = node.open()
    qtbot.waitUntil(lambda: len(window.peer_ips()) == 3, timeout=WAIT_MS)
    assert node.bob.send_now(ME, "hi alice, are you on the mesh?").status == "delivered"
    window.select_peer(BOB)
    window.entry.setText("yes: straight to your IP, no broker in between")
    window.send_current()
    qtbot.waitUntil(lambda: "✓ delivered" in item_text(window), timeout=WAIT_MS)
    assert node.bob.send_now(ME, "great, the control plane never saw that").status == "delivered"
    qtbot.waitUntil(lambda: "never saw" in item_text(window), timeout=WAIT_MS)
    node.bob.close()
    window.entry.setText("and now?")
    window.send_current()
    qtbot.waitUntil(lambda: "✗ failed" in item_text(window), timeout=WAIT_MS)
    node.agent.set_status(status([peer(BOB, "bob"), peer(CAROL, "carol", handshake_age=None),
                                  peer(DAVE, "dave", state="unreachable"), peer("127.0.0.6", "erin")]))
    qtbot.waitUntil(lambda: len(window.peer_ips()) == 4, timeout=WAIT_MS)
    send_message(ME, node.bob.port, ChatMessage(uuid.uuid4().hex, "carol", time.time(), "lunch?"),
                 timeout=2, source_ip=CAROL)
    qtbot.waitUntil(lambda: "1 new" in window.peer_item(CAROL).text(), timeout=WAIT_MS)
    window.entry.setText("")
    window.resize(900, 520)
    path = tmp_path / "chat.png"
    assert window.grab().save(str(path))
    assert path.stat().st_size > 10_000
    target = os.environ.get("MESHCHAT_SCREENSHOT")
    if target:
        assert window.grab().save(target)


class ThreadRecordingHistory:
    """A HistoryStore (a MemoryHistory inside) that remembers which thread made each call."""

    def __init__(self) -> None:
        self.store = MemoryHistory()  # fill it directly: those calls are not recorded
        self.calls: list[tuple[str, int, str]] = []  # method, thread ident, thread name
        self._lock = threading.Lock()

    def __getattr__(self, method: str):
        target = getattr(self.store, method)

        def call(*args, **kwargs):
            thread = threading.current_thread()
            with self._lock:
                self.calls.append((method, thread.ident, thread.name))
            return target(*args, **kwargs)

        return call


def test_history_is_read_and_written_off_the_gui_thread(node, qtbot):
    gui = threading.get_ident()  # pytest-qt runs the test, and the Qt event loop, on this thread
    history = ThreadRecordingHistory()
    now = time.time()
    history.store.add(Record(BOB, uuid.uuid4().hex, "out", "alice", "from last week", now - 60, "delivered"))
    history.store.add(Record(BOB, uuid.uuid4().hex, "in", "bob", "you there?", now - 50, "received", read=False))
    history.store.add(Record(BOB, uuid.uuid4().hex, "out", "alice", "this one failed", now - 40, "failed", "timed out"))
    window = node.open(history)

    # Unread counts are read at start, before any message arrives.
    qtbot.waitUntil(lambda: "1 new" in window.peer_item(BOB).text(), timeout=WAIT_MS)
    window.select_peer(BOB)
    qtbot.waitUntil(lambda: window.conversation.count() == 3, timeout=WAIT_MS)
    assert "from last week" in item_text(window, 0) and "✓ delivered" in item_text(window, 0)
    assert item_text(window, 1).startswith("bob ·")
    assert "✗ failed" in item_text(window) and "reason: timed out" in item_text(window)
    qtbot.waitUntil(lambda: window.unread(BOB) == 0, timeout=WAIT_MS)
    assert window.peer_item(BOB).text() == f"bob\n{BOB}"

    # A failed message from history can be retried, a new one sent, an incoming one shown.
    window.conversation.setCurrentRow(2)
    assert window.retry_button.isEnabled()
    qtbot.mouseClick(window.retry_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "✓ delivered" in item_text(window, 2), timeout=WAIT_MS)
    window.entry.setText("and a new one")
    window.send_current()
    qtbot.waitUntil(lambda: "and a new one" in item_text(window) and "✓ delivered" in item_text(window),
                    timeout=WAIT_MS)
    assert node.bob.send_now(ME, "got both").status == "delivered"
    qtbot.waitUntil(lambda: "got both" in item_text(window), timeout=WAIT_MS)
    assert window.conversation.count() == 5
    assert [r.text for r in node.bob.history.conversation(ME)] == ["this one failed", "and a new one", "got both"]

    methods = {method for method, _, _ in history.calls}
    assert {"conversation", "mark_read", "unread_counts", "add", "get", "set_status"} <= methods
    on_gui = [(method, name) for method, ident, name in history.calls if ident == gui]
    assert on_gui == [], f"history called on the GUI thread: {on_gui}"
    # The window's own reads (conversation, unread counts) are on its history thread, not a delivery worker's.
    assert {name for method, _, name in history.calls if method in ("conversation", "unread_counts")} == {
        "chat-history"}



def test_outcomes_queued_before_close_are_dropped_after_it(node, qtbot):
    from PySide6.QtCore import QCoreApplication

    window = node.open()
    ran = []
    # Emitted from another thread, a signal is queued for the GUI thread: these three are on their way when the
    # window closes, and must find it closed rather than touch its widgets.
    late = threading.Thread(target=lambda: (
        window._bridge.outcome.emit(ran.append, "outcome"),
        window._bridge.record.emit(Record(BOB, uuid.uuid4().hex, "in", "bob", "late", time.time(), "received")),
        window._bridge.snapshot.emit(None, "agent gone", "not listening"),
    ))
    late.start()
    late.join()
    shown = window.conversation.count()
    window.close()
    QCoreApplication.processEvents()
    assert ran == []
    assert window.conversation.count() == shown
