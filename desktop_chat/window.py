"""The Qt window: peers on the left, the conversation with the selected peer on the right.

Nothing here blocks the event loop: the agent is polled by a PeerPoller thread, messages are delivered by
ChatSession worker threads, and every history read and write (SQLite on disk) runs on one HistoryJobs thread.
All of them reach the window through Qt signals, which Qt queues onto the GUI thread. The window keeps what it
shows (the open conversation, unread counts) and never asks the history from the GUI thread.
Requires PySide6 (the `chat` extra); the CLI imports this module only for `meshchat gui`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QPoint, Qt, Signal
from PySide6.QtGui import QAction, QBrush, QColor, QIcon, QPainter, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMenu,
    QPushButton,
    QSplitter,
    QStatusBar,
    QVBoxLayout,
    QWidget,
)

from desktop_chat.display import PRESENCE_COLOURS, peer_text, record_text, status_html, title_html
from desktop_chat.errors import ChatError
from desktop_chat.history import HistoryStore, Record
from desktop_chat.historyjobs import HistoryJobs
from desktop_chat.peers import AgentPeerSource, PeerDirectory, PeerSnapshot, PeerSource
from desktop_chat.session import ChatSession, PeerPoller, check_text
from desktop_chat.settings import ChatSettings

log = logging.getLogger(__name__)

IP_ROLE = Qt.ItemDataRole.UserRole
PRESENCE_ROLE = Qt.ItemDataRole.UserRole + 1
MSG_ROLE = Qt.ItemDataRole.UserRole + 2


def _dot(colour: str, size: int = 14) -> QIcon:
    pixmap = QPixmap(size, size)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setBrush(QColor(colour))
    painter.setPen(Qt.PenStyle.NoPen)
    painter.drawEllipse(1, 1, size - 2, size - 2)
    painter.end()
    return QIcon(pixmap)


class _Bridge(QObject):
    """Carries events from worker threads to the GUI thread (signals emitted elsewhere are queued)."""

    snapshot = Signal(object, object, object)  # PeerSnapshot | None, agent error | None, listen text
    record = Signal(object)  # Record
    outcome = Signal(object, object)  # a GUI-thread handler and the history job's result (or ChatError) for it


class ChatWindow(QMainWindow):
    """The meshchat window. Call start() to begin polling the agent; close() stops everything."""

    def __init__(
        self,
        *,
        session: ChatSession,
        source: PeerSource,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.session = session
        self._clock = clock
        self._closed = False
        self._current_ip: str | None = None
        self._snapshot: PeerSnapshot | None = None
        self._agent_error: str | None = None
        self._listen_text = "not listening yet"
        self._unread: dict[str, int] = {}  # as last read from the history
        # While the open conversation is being read (read number _load_id), records for it wait in _held and are
        # applied on top of what was read: the read may predate them.
        self._load_id = 0
        self._loading = False
        self._held: list[Record] = []
        self._jobs = HistoryJobs()
        self._icons = {state: _dot(colour) for state, colour in PRESENCE_COLOURS.items()}

        self._bridge = _Bridge()
        self._bridge.snapshot.connect(self._on_snapshot)
        self._bridge.record.connect(self._on_record)
        self._bridge.outcome.connect(self._on_outcome)
        session.subscribe(self._record_from_thread)
        self._poller = PeerPoller(source, session.directory, interval=poll_interval, clock=clock,
                                  on_update=self._update_from_thread)
        self._build()

    # -- layout ---------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.setWindowTitle("meshchat")
        self.resize(860, 520)

        self.peer_list = QListWidget()
        self.peer_list.setObjectName("peers")
        self.peer_list.setIconSize(self._icons["online"].availableSizes()[0])
        self.peer_list.setSpacing(2)
        self.peer_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        # A conversation opens on a selection (click, arrow keys, select_peer), never on a change of the current
        # item alone: whenever the list gets keyboard focus with no current item, Qt makes the first one current
        # without selecting it, e.g. when the window is activated after the first peers arrived. Following that
        # would open, and mark read, a conversation the user never chose.
        self.peer_list.itemSelectionChanged.connect(self._on_peer_selected)
        peers_title = QLabel("<b>Peers</b> <span style='color:#666'>(mesh members)</span>")
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(6, 6, 0, 6)
        left_layout.addWidget(peers_title)
        left_layout.addWidget(self.peer_list)
        legend = QLabel(" &nbsp; ".join(
            f"<span style='color:{colour}'>●</span> {state}" for state, colour in PRESENCE_COLOURS.items()))
        legend.setToolTip("online: handshake within the window · idle: tunnel up, no recent handshake · "
                          "offline: marked unreachable or no tunnel")
        left_layout.addWidget(legend)

        self.conversation_title = QLabel("Select a peer to chat with")
        self.conversation_title.setTextFormat(Qt.TextFormat.RichText)
        self.conversation = QListWidget()
        self.conversation.setObjectName("conversation")
        self.conversation.setWordWrap(True)
        self.conversation.setSpacing(3)
        self.conversation.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.conversation.customContextMenuRequested.connect(self._on_conversation_menu)
        self.conversation.currentItemChanged.connect(lambda *_: self._update_buttons())
        self.entry = QLineEdit()
        self.entry.setPlaceholderText("Type a message and press Enter")
        self.entry.returnPressed.connect(self.send_current)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self.send_current)
        self.retry_button = QPushButton("Retry")
        self.retry_button.setToolTip("Send the selected failed message again")
        self.retry_button.clicked.connect(self.retry_selected)
        compose = QHBoxLayout()
        compose.addWidget(self.entry, 1)
        compose.addWidget(self.send_button)
        compose.addWidget(self.retry_button)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 6, 6, 6)
        right_layout.addWidget(self.conversation_title)
        right_layout.addWidget(self.conversation, 1)
        right_layout.addLayout(compose)

        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([260, 600])
        self.setCentralWidget(splitter)

        self.status_label = QLabel()
        status = QStatusBar()
        status.addWidget(self.status_label, 1)
        self.setStatusBar(status)
        self._update_status()
        self._update_buttons()

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin polling the agent (the first poll happens at once, in the poller thread) and read unread counts."""
        self._jobs.start()
        self._poller.start()
        self._query_unread()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self._closed = True
        self._poller.stop()
        self._jobs.stop()  # after the queued jobs: a message being stored is stored and its delivery started
        self.session.close(wait=0.5)
        super().closeEvent(event)

    # -- worker threads -> GUI thread -----------------------------------------------------------------

    def _update_from_thread(self, snapshot: PeerSnapshot | None, error: str | None) -> None:
        # Runs in the poller thread: (re)binding the listener there keeps the GUI thread free.
        try:
            address = self.session.ensure_listening()
            listen = f"listening on {address[0]}:{address[1]}" if address else "waiting for our mesh IP"
        except ChatError as exc:
            listen = f"NOT listening: {exc}"
        if not self._closed:
            self._bridge.snapshot.emit(snapshot, error, listen)

    def _record_from_thread(self, record: Record) -> None:
        if not self._closed:
            self._bridge.record.emit(record)

    def _in_background(self, job: Callable[[], Any], done: Callable[[Any], None] | None = None,
                       failed: Callable[[ChatError], None] | None = None) -> None:
        """Run `job` (history I/O) on the history thread; `done(result)` or `failed(error)` on the GUI thread."""

        def to_gui(handler: Callable[[Any], None]) -> Callable[[Any], None]:
            return lambda value: None if self._closed else self._bridge.outcome.emit(handler, value)

        self._jobs.submit(job, done=to_gui(done) if done else None, failed=to_gui(failed or self._show_history_error))

    # The three slots below run on the GUI thread for signals other threads emitted: one emitted just before
    # close() is still delivered after it, when the window's widgets may be gone. Nothing is shown any more.
    def _on_outcome(self, handler: Callable[[Any], None], value: Any) -> None:
        if not self._closed:
            handler(value)

    def _show_history_error(self, exc: ChatError) -> None:
        log.warning("chat history: %s", exc)
        self.statusBar().showMessage(f"history: {exc}", 5000)

    # -- peers ----------------------------------------------------------------------------------------

    def _on_snapshot(self, snapshot: PeerSnapshot | None, error: str | None, listen: str) -> None:
        if self._closed:
            return
        self._snapshot = snapshot
        self._agent_error = error
        self._listen_text = listen
        self._refresh_peers()
        self._update_title()
        self._update_status()

    def _refresh_peers(self) -> None:
        peers = self._snapshot.peers if self._snapshot else ()
        unread = self._unread
        wanted = {p.mesh_ip: p for p in peers}
        # Removing or moving the current item makes Qt select another one; with signals on, that would open
        # (and mark read) a conversation the user never chose. The selection is restored explicitly below.
        self.peer_list.blockSignals(True)
        try:
            for row in reversed(range(self.peer_list.count())):
                if self.peer_list.item(row).data(IP_ROLE) not in wanted:
                    self.peer_list.takeItem(row)
            for index, peer in enumerate(peers):
                item = self.peer_item(peer.mesh_ip)
                if item is None:
                    item = QListWidgetItem()
                    item.setData(IP_ROLE, peer.mesh_ip)
                    self.peer_list.insertItem(index, item)
                elif self.peer_list.row(item) != index:
                    self.peer_list.takeItem(self.peer_list.row(item))
                    self.peer_list.insertItem(index, item)
                count = unread.get(peer.mesh_ip, 0)
                item.setText(peer_text(peer, count))
                item.setIcon(self._icons[peer.presence])
                item.setData(PRESENCE_ROLE, peer.presence)
                item.setToolTip(f"{peer.name} ({peer.node_id})\nmesh IP {peer.mesh_ip}\n"
                                f"{peer.presence}: {peer.detail}")
                font = item.font()
                font.setBold(count > 0)
                item.setFont(font)
            current = self.peer_item(self._current_ip) if self._current_ip else None
            if current is not None:
                self.peer_list.setCurrentItem(current)
            else:
                # The open conversation's peer left the mesh: keep the conversation, select nothing.
                self.peer_list.setCurrentItem(None)
                self.peer_list.clearSelection()
        finally:
            self.peer_list.blockSignals(False)

    def peer_item(self, mesh_ip: str) -> QListWidgetItem | None:
        """The left-pane item for `mesh_ip`, or None if it is not listed."""
        for row in range(self.peer_list.count()):
            item = self.peer_list.item(row)
            if item.data(IP_ROLE) == mesh_ip:
                return item
        return None

    def peer_ips(self) -> list[str]:
        """The mesh IPs listed in the left pane, top to bottom."""
        return [self.peer_list.item(row).data(IP_ROLE) for row in range(self.peer_list.count())]

    def select_peer(self, mesh_ip: str) -> None:
        """Select `mesh_ip` in the left pane (ChatError if it is not listed)."""
        item = self.peer_item(mesh_ip)
        if item is None:
            raise ChatError(f"{mesh_ip} is not in the peer list")
        self.peer_list.setCurrentItem(item)

    def _on_peer_selected(self) -> None:
        selected = self.peer_list.selectedItems()
        if not selected:
            return  # nothing selected any more (e.g. ctrl+click): keep the open conversation
        ip = selected[0].data(IP_ROLE)
        if ip != self._current_ip:
            self._current_ip = ip
            self._load_conversation(ip)
            self._update_title()
            self._update_buttons()
            self.entry.setFocus()

    def _update_title(self) -> None:
        ip = self._current_ip
        self.conversation_title.setText(title_html(ip, self.session.directory.get(ip) if ip else None))

    def _update_status(self) -> None:
        snap = self._snapshot
        self.status_label.setText(status_html(name=self.session.name, snapshot=snap, agent_error=self._agent_error,
                                              listen=self._listen_text))
        self.setWindowTitle(f"meshchat — {self.session.name}" + (f" ({snap.self_ip})" if snap else ""))

    # -- conversation ---------------------------------------------------------------------------------

    def _style(self, item: QListWidgetItem, record: Record) -> None:
        item.setText(record_text(record))
        item.setData(MSG_ROLE, (record.msg_id, record.direction, record.status, record.seq))
        if record.direction == "out":
            item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            colour = {"failed": PRESENCE_COLOURS["offline"], "sending": "#777777"}.get(record.status, "#1a237e")
            item.setBackground(QBrush(QColor("#ffebee" if record.status == "failed" else "#e8eaf6")))
        else:
            item.setTextAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
            colour = "#1b1b1b"
            item.setBackground(QBrush(QColor("#f1f8e9")))
        item.setForeground(QBrush(QColor(colour)))
        item.setToolTip(record.reason or "")

    def _load_conversation(self, ip: str) -> None:
        self.conversation.clear()
        self._load_id += 1
        self._loading = True
        self._held = []
        history, load_id = self.session.history, self._load_id

        def read() -> tuple[int, list[Record], dict[str, int]]:
            records = history.conversation(ip)
            history.mark_read(ip)  # shown now: read
            return load_id, records, history.unread_counts()

        self._in_background(read, self._on_conversation_read)

    def _on_conversation_read(self, result: tuple[int, list[Record], dict[str, int]]) -> None:
        load_id, records, unread = result
        self._unread = unread
        if load_id == self._load_id:  # else another peer was chosen meanwhile: its read is on the way
            self._loading = False
            for record in records:
                item = QListWidgetItem()
                self._style(item, record)
                self.conversation.addItem(item)
            held, self._held = self._held, []
            for record in held:
                self._show(record)
            self.conversation.scrollToBottom()
            self._update_buttons()
        self._refresh_peers()

    def _query_unread(self, *, mark_read: str | None = None) -> None:
        history = self.session.history

        def read() -> dict[str, int]:
            if mark_read is not None:
                history.mark_read(mark_read)
            return history.unread_counts()

        self._in_background(read, self._on_unread)

    def _on_unread(self, unread: dict[str, int]) -> None:
        self._unread = unread
        self._refresh_peers()

    def message_item(self, msg_id: str) -> QListWidgetItem | None:
        """The conversation item showing message `msg_id`, or None."""
        for row in range(self.conversation.count()):
            item = self.conversation.item(row)
            if item.data(MSG_ROLE)[0] == msg_id:
                return item
        return None

    def _show(self, record: Record) -> None:
        item = self.message_item(record.msg_id)
        if item is None:
            # Records come from several threads (deliveries, the server, the history thread): place by store order.
            item = QListWidgetItem()
            row = self.conversation.count()
            while row > 0 and self.conversation.item(row - 1).data(MSG_ROLE)[3] > record.seq:
                row -= 1
            self.conversation.insertItem(row, item)
            self.conversation.scrollToBottom()
        self._style(item, record)

    def _on_record(self, record: Record) -> None:
        if self._closed:
            return
        shown = record.peer_ip == self._current_ip
        if shown and self._loading:
            self._held.append(record)
        elif shown:
            self._show(record)
        if record.direction == "in":
            # Shown in the open conversation: read. Either way the unread counts changed.
            self._query_unread(mark_read=record.peer_ip if shown else None)
        self._update_buttons()

    def unread(self, mesh_ip: str) -> int:
        """Unread incoming messages from `mesh_ip`, as last read from the history."""
        return self._unread.get(mesh_ip, 0)

    def send_current(self) -> None:
        """Send the text in the entry to the selected peer."""
        text = self.entry.text()
        ip = self._current_ip
        if ip is None or not text.strip():
            return
        try:
            check_text(text)
        except ChatError as exc:
            self.statusBar().showMessage(f"not sent: {exc}", 5000)
            return
        self.entry.clear()

        def not_stored(exc: ChatError) -> None:
            if not self.entry.text():
                self.entry.setText(text)  # give the text back rather than lose it
            self.statusBar().showMessage(f"not sent: {exc}", 5000)

        # Storing it is history I/O: the session stores it on the history thread and announces the record.
        self._in_background(lambda: self.session.send(ip, text), failed=not_stored)

    def _selected_failed(self) -> str | None:
        item = self.conversation.currentItem()
        if item is None:
            return None
        msg_id, direction, status, _ = item.data(MSG_ROLE)
        return msg_id if direction == "out" and status == "failed" else None

    def retry_selected(self) -> None:
        """Send the selected failed message again."""
        msg_id = self._selected_failed()
        ip = self._current_ip
        if msg_id is None or ip is None:
            return

        def not_retried(exc: ChatError) -> None:
            self.statusBar().showMessage(f"not retried: {exc}", 5000)

        self._in_background(lambda: self.session.retry(ip, msg_id), failed=not_retried)

    def _on_conversation_menu(self, pos: QPoint) -> None:
        item = self.conversation.itemAt(pos)
        if item is None:
            return
        self.conversation.setCurrentItem(item)
        if self._selected_failed() is None:
            return
        menu = QMenu(self)
        retry = QAction("Retry", menu)
        retry.triggered.connect(self.retry_selected)
        menu.addAction(retry)
        menu.exec(self.conversation.viewport().mapToGlobal(pos))

    def _update_buttons(self) -> None:
        has_peer = self._current_ip is not None
        self.entry.setEnabled(has_peer)
        self.send_button.setEnabled(has_peer)
        self.retry_button.setEnabled(self._selected_failed() is not None)


def run(settings: ChatSettings, *, history: HistoryStore) -> int:
    """Open the window for `settings` and run the Qt event loop until it closes; the exit code."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("meshchat")
    directory = PeerDirectory()
    session = ChatSession(history=history, directory=directory, port=settings.port, timeout=settings.timeout,
                          name=settings.name, bind=settings.bind)
    source = AgentPeerSource(settings.socket, timeout=2.0, window=settings.handshake_window)
    window = ChatWindow(session=session, source=source, poll_interval=settings.poll_interval)
    window.show()
    window.start()
    try:
        return app.exec()
    finally:
        history.close()


__all__ = ["ChatWindow", "run"]
