#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import NIOCore
import NIOPosix
import Synchronization
import WeftChunks
import WeftProto

/// What a connection handler shares with its server: the hub, the worker pool, the limits, and
/// the count of connections not yet fully wound down (for an orderly shutdown).
final class ServerCore: @unchecked Sendable {
    let hub: HubAPI
    let pool: NIOThreadPool
    let logger: Logger
    let maxInFlightRequestsPerConnection: Int
    /// Stored-block bytes sent from their files with `sendfile`, and read into buffers instead
    /// (SPEC.md §4, Stored-block reads).
    let spanBytesSent = Atomic<Int>(0)
    let spanBytesCopied = Atomic<Int>(0)
    /// Stored-block bytes sent from the hub's read cache (SPEC.md §4, Hub read cache).
    let spanBytesFromMemory = Atomic<Int>(0)
    /// Requests read and not finished, for `barrier` (SPEC.md §4, Barriers).
    let ledger = RequestLedger()
    /// How long a barrier waits for earlier requests before it answers ETIMEDOUT.
    static let barrierWaitMs = 20_000
    /// Barriers waiting at once, each on a thread of its own; one more is answered EAGAIN.
    static let barrierThreadsMax = 64
    let barrierThreads = ThreadCount()

    private let lock = PthreadMutex()
    private let idle = ConditionVariable()
    private var liveConnections = 0
    /// The agent name each session opened through this server gave, until the session closes:
    /// barriers key commits by agent, so that a session reopened after a lost connection (a
    /// new id, the same agent) still waits for the old session's commits (SPEC.md §4, Barriers).
    private var agentOfSession: [SessionID: String] = [:]

    /// Per client that fenced (opcode 51), its newest connection number and the connections that
    /// sent it; kept `fenceMemoryNs` after they end (SPEC.md §4, Fences).
    private var fences: [UInt64: ClientFence] = [:]
    /// Entries after the last prune: the next prune comes when they have doubled.
    private var fencesAfterPrune = 0
    private struct ClientFence {
        var connection: UInt64
        var holders: [WeakConnection]
        var touchedNs: UInt64
    }
    private final class WeakConnection {
        weak var value: HubConnection?
        init(_ value: HubConnection) { self.value = value }
    }
    /// How long a client's newest connection number is remembered after its connections ended:
    /// longer than any connection whose first frame is still on its way may live unread (weftd
    /// ends a silent connection after its session timeout, at most 1 hour).
    static let fenceMemoryNs: UInt64 = 2 * 3600 * 1_000_000_000

    /// Connection `number` of `client` arrived on `connection`: every connection of the client
    /// with a smaller number is fenced (SPEC.md §4, Fences). ESTALE, and this connection fenced,
    /// if a connection with a number as large fenced first.
    func fence(client: UInt64, number: UInt64, from connection: HubConnection) -> Result<HubResponse, WeftError> {
        let now = MonotonicClock.nowNs()
        enum Plan { case fence([HubConnection]), stale(UInt64) }
        let plan: Plan = lock.withLock {
            if fences.count >= max(64, 2 * fencesAfterPrune) {
                fences = fences.filter { _, entry in
                    entry.holders.contains { $0.value != nil } || now &- entry.touchedNs < Self.fenceMemoryNs
                }
                fencesAfterPrune = fences.count
            }
            guard var entry = fences[client] else {
                fences[client] = ClientFence(connection: number, holders: [WeakConnection(connection)], touchedNs: now)
                return .fence([])
            }
            if entry.connection == number, entry.holders.contains(where: { $0.value === connection }) {
                return .fence([])   // the same connection again
            }
            guard number > entry.connection else { return .stale(entry.connection) }
            let earlier = entry.holders.compactMap(\.value)
            entry = ClientFence(connection: number, holders: [WeakConnection(connection)], touchedNs: now)
            fences[client] = entry
            return .fence(earlier)
        }
        switch plan {
        case .stale(let newest):
            connection.fence(because: "connection \(newest) of its client came first", endNow: false)
            return .failure(WeftError(ESTALE, "connection \(number) of client \(hex(client)) was replaced by connection \(newest)"))
        case .fence(let earlier):
            for old in earlier {
                old.fence(because: "connection \(number) of its client replaced it")
            }
            if !earlier.isEmpty {
                logger.info("fenced an agent's earlier connection", metadata: [
                    "client": "\(hex(client))", "connection": "\(number)", "fenced": "\(earlier.map(\.peer))"])
            }
            return .success(.empty)
        }
    }

    /// The newest connection number `client` fenced with, if the server remembers one.
    func newestFencedConnection(ofClient client: UInt64) -> UInt64? {
        lock.withLock { fences[client]?.connection }
    }

    /// The ledger's key for a commit or barrier of `ino` by `session`.
    func ledgerKey(session: SessionID, ino: InodeID) -> RequestLedger.Key {
        let agent = lock.withLock { agentOfSession[session] } ?? "session \(session)"
        return RequestLedger.Key(agent: agent, ino: ino)
    }

    /// The co-located reads this server offers (opcode 56), if any.
    let localReadsOffered = Mutex<LocalReadServer?>(nil)

    init(hub: HubAPI, pool: NIOThreadPool, logger: Logger, maxInFlightRequestsPerConnection: Int) {
        self.hub = hub
        self.pool = pool
        self.logger = logger
        self.maxInFlightRequestsPerConnection = maxInFlightRequestsPerConnection
    }

    func connectionStarted() {
        lock.withLock { liveConnections += 1 }
    }

    func connectionFinished() {
        lock.withLock {
            liveConnections -= 1
            precondition(liveConnections >= 0)
            if liveConnections == 0 { idle.broadcast() }
        }
    }

    /// Waits until every connection has finished its requests and closed its sessions; false on timeout.
    func waitUntilIdle(timeoutMs: Int) -> Bool {
        let deadline = MonotonicClock.deadlineNs(afterMs: timeoutMs)
        return lock.withLock {
            while liveConnections > 0 {
                if !idle.wait(lock, deadlineNs: deadline) { return false }
            }
            return true
        }
    }

    /// What a worker produced for one request frame.
    enum Outcome {
        case respond(ByteBuffer, SessionChange)
        /// A `readBlocks` response: `head`, then the blocks' file span, then the trailer
        /// (`DirectSender.send(_:blocks:)`).
        case respondBlocks(ByteBuffer, StoredBlocks)
        /// The frame is malformed: the connection must close.
        case violation(WeftError)
    }

    enum SessionChange {
        case none
        case opened(SessionID)
        case closed(SessionID)
    }

    /// Decodes and runs one request on the calling (worker) thread and encodes its response.
    func execute(_ frame: InboundFrame, number: UInt64, allocator: ByteBufferAllocator, cancelled: Bool,
                 refused: Bool = false, leases: ConnectionLeases?, connection: HubConnection? = nil) -> Outcome {
        let id = frame.header.requestID
        guard let opcode = HubOpcode(rawValue: frame.header.opcode) else {
            // A newer agent's method: answered, not fatal (SPEC.md §Wire protocol, versioning).
            let error = WeftError(ENOSYS, "opcode \(frame.header.opcode) is unknown to this hub")
            return .respond(WireCodec.responseBuffer(id: id, rawOpcode: frame.header.opcode, .failure(error),
                                                     allocator: allocator), .none)
        }
        if !cancelled, let outcome = executeBulk(opcode, frame, allocator: allocator) { return outcome }
        let request: HubRequest
        do {
            request = try WireCodec.decodeRequest(opcode: opcode, payload: frame.payload)
        } catch let error as WeftError {
            return .violation(WeftError(error.errno, "\(opcode) request \(id): \(error.message)"))
        } catch {
            return .violation(WeftError(EBADMSG, "\(opcode) request \(id): \(error)"))
        }
        let result: Result<HubResponse, WeftError>
        if cancelled {
            result = .failure(WeftError(ESHUTDOWN, "hub is shutting down"))
        } else if case .barrier = request, refused {
            result = .failure(WeftError(EAGAIN, "\(Self.barrierThreadsMax) barriers wait already"))
        } else if case .barrier(let c, let ino) = request {
            let deadline = MonotonicClock.deadlineNs(afterMs: Self.barrierWaitMs)
            let key = ledgerKey(session: c.session, ino: ino)
            result = ledger.waitForEarlier(than: number, key: key, deadlineNs: deadline)
                ? .success(.empty)
                : .failure(WeftError(ETIMEDOUT, "commits of inode \(ino) read before the barrier are still running after \(Self.barrierWaitMs / 1000) s"))
        } else if case let .fence(client, fenceNumber) = request {
            if let connection {
                result = fence(client: client, number: fenceNumber, from: connection)
            } else {
                result = .failure(WeftError(EINVAL, "fence is only served over a connection"))
            }
        } else if case .localReads = request {
            result = localReadsOffer(connection)
        } else if case .enableLeases(let session) = request {
            // Recalls for this session go back on this connection.
            result = Result {
                guard let leases else { throw WeftError(EINVAL, "no connection to call back on") }
                try hub.enableLeases(session, client: SessionLeaseClient(session: session, connection: leases))
                return .empty
            }.mapError { $0 as? WeftError ?? WeftError(EIO, "\($0)") }
        } else {
            result = request.perform(on: hub)
        }
        var change = SessionChange.none
        switch (request, result) {
        case (.openSession(let agent), .success(.session(let session, _))),
             (.openVolumeSession(let agent, _), .success(.session(let session, _))),
             (.openDataSession(let agent, _), .success(.session(let session, _))):
            lock.withLock { agentOfSession[session] = agent }
            change = .opened(session)
        case (.closeSession(let session), .success):
            lock.withLock { _ = agentOfSession.removeValue(forKey: session) }
            change = .closed(session)
        default: break
        }
        return .respond(WireCodec.responseBuffer(id: id, rawOpcode: opcode.rawValue, result, allocator: allocator), change)
    }

    /// writeSlice, writeObject, readSlice and readSliceFrom without intermediate arrays (SPEC.md §4, Bulk
    /// transfers): written data is stored from the frame (page-aligned by `detachingBulk`, so
    /// the store writes it direct); read data goes straight into the response frame. Nil for any other request (and
    /// for a read over the transfer limit: the general path answers it with the hub's error).
    private func executeBulk(_ opcode: HubOpcode, _ frame: InboundFrame, allocator: ByteBufferAllocator) -> Outcome? {
        let id = frame.header.requestID
        switch opcode {
        case .writeSlice, .writeObject:
            let result: Result<HubResponse, WeftError>
            do {
                result = try frame.payload.withUnsafeReadableBytes { raw in
                    var reader = ByteReader(raw)
                    let context = try RequestContext.decode(from: &reader)
                    let (sliceID, data) = try HubRequest.decodeWriteSliceTail(from: &reader)
                    guard reader.isAtEnd else { throw WireCodec.trailingBytes(reader.remaining, opcode) }
                    return Result {
                        // Data of 64 KiB and more was put on a page by `detachingBulk`.
                        if opcode == .writeObject {
                            try hub.writeObject(context, id: sliceID, image: data)
                        } else {
                            try hub.writeSlice(context, id: sliceID, bytes: data)
                        }
                        return .empty
                    }.mapError { $0 as? WeftError ?? WeftError(EIO, "hub failed: \($0)") }
                }
            } catch let error as WeftError {
                return .violation(WeftError(error.errno, "\(opcode) request \(id): \(error.message)"))
            } catch {
                return .violation(WeftError(EBADMSG, "\(opcode) request \(id): \(error)"))
            }
            return .respond(WireCodec.responseBuffer(id: id, rawOpcode: opcode.rawValue, result, allocator: allocator), .none)
        case .readSlice, .readSliceFrom:
            guard let request = try? WireCodec.decodeRequest(opcode: opcode, payload: frame.payload) else { return nil }
            switch request {
            case let .readSlice(context, sliceID, offset, length) where Int(length) <= Limits.transferMaxBytes:
                return .respond(WireCodec.bulkResponseBuffer(id: id, rawOpcode: opcode.rawValue, count: Int(length),
                                                             allocator: allocator) {
                    try hub.readSlice(context, id: sliceID, offset: offset, into: $0)
                }, .none)
            case let .readSliceFrom(context, sliceID, offset, length, holders) where Int(length) <= Limits.transferMaxBytes:
                return .respond(WireCodec.bulkResponseBuffer(id: id, rawOpcode: opcode.rawValue, count: Int(length),
                                                             allocator: allocator) {
                    try hub.readSlice(context, id: sliceID, offset: offset, holders: holders, into: $0)
                }, .none)
            default:
                return nil
            }
        case .readBlocks:
            guard case let .readBlocks(context, sliceID, firstBlock, count)?
                    = try? WireCodec.decodeRequest(opcode: opcode, payload: frame.payload) else { return nil }
            let failure: WeftError
            do {
                let blocks = try hub.storedBlocks(context, id: sliceID, firstBlock: Int(firstBlock), count: Int(count))
                if let head = WireCodec.storedBlocksHead(id: id, blocks: blocks, allocator: allocator) {
                    return .respondBlocks(head, blocks)
                }
                failure = WeftError(EMSGSIZE, "\(blocks.byteCount) stored bytes exceed the wire limit")
            } catch {
                failure = error as? WeftError ?? WeftError(EIO, "hub failed: \(error)")
            }
            return .respond(WireCodec.responseBuffer(id: id, rawOpcode: opcode.rawValue, .failure(failure),
                                                     allocator: allocator), .none)
        default:
            return nil
        }
    }

    /// The reply of opcode 56: the socket's name and the peer as this connection sees it
    /// (SPEC.md §4, Co-located reads); ENOSYS without an offer or an IP peer.
    private func localReadsOffer(_ connection: HubConnection?) -> Result<HubResponse, WeftError> {
        guard let server = localReadsOffered.withLock({ $0 }), let connection,
              let peer = LocalReadClient.endpoint(connection.peer) else {
            return .failure(WeftError(ENOSYS, "this hub offers no co-located reads on this connection"))
        }
        return .success(.bytes(server.offer(peer: peer).encoded()))
    }

    /// Ends `sessions` on the worker pool, then marks the connection finished.
    func closeSessions(_ sessions: [SessionID], peer: String) {
        if sessions.isEmpty {
            connectionFinished()
            return
        }
        pool.submit { [self] _ in
            for session in sessions {
                lock.withLock { _ = agentOfSession.removeValue(forKey: session) }
                do {
                    try hub.closeSession(session)
                    logger.debug("closed session of departed agent", metadata: ["peer": "\(peer)", "session": "\(session)"])
                } catch {
                    logger.warning("could not close session of departed agent",
                                   metadata: ["peer": "\(peer)", "session": "\(session)", "error": "\(error)"])
                }
            }
            connectionFinished()
        }
    }
}
