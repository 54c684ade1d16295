#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import WeftProto

/// `HubAPI` over the network: a client of `HubServer`.
///
/// Guarantees:
/// - methods block the calling thread (never call them on an event loop: EDEADLK) and are safe
///   from many threads at once; their requests share one connection, pipelined;
/// - every call returns or throws within `requestTimeoutMs` (ETIMEDOUT) plus, when it has to
///   connect first, `connectTimeoutMs`; a hub that refuses or does not answer the connection gives
///   EIO "hub HOST:PORT does not answer"; requests in flight when the connection drops fail with
///   EIO and are not resent (they may or may not have taken effect); the next call reconnects;
/// - sessions survive reconnects: each session opened through this client is reopened (same
///   agent name) on every new connection, and the id the caller got from `openSession` keeps
///   working: the live session id is substituted into each request. Open-file references held by
///   the old session are dropped by the hub when it sees the old connection end;
/// - at most `maxInFlightRequests` requests are outstanding; further callers wait for a slot
///   (within their own timeout).
public final class RemoteHub: HubAPI, @unchecked Sendable {
    public static let maxInFlightRequests = 1024
    /// How often a connection pings its hub, so that the hub can tell a live idle agent from a
    /// dead or cut-off one (`HubServer` idle timeout).
    public static let heartbeatMs = 1_000
    /// Request id of pings; real requests start at 1. Their answers find no waiter and are dropped.
    static let pingRequestID: UInt64 = 0

    public let address: HubAddress
    /// This client's name in `fence` requests (random; SPEC.md §4, Fences).
    public let clientID: UInt64
    public let connectTimeoutMs: Int
    public let requestTimeoutMs: Int
    let logger: Logger

    private let group: MultiThreadedEventLoopGroup
    private let waiters = ThreadSpecificVariable<ResponseWaiter>()

    private enum State {
        case disconnected
        case connecting
        case connected(ClientConnection)
        case closed
    }

    // Guarded by `lock`.
    private let lock = PthreadMutex()
    /// Opcodes the hub answered with ENOSYS: it is older than those methods. Forgotten on every
    /// new connection (the hub may have been upgraded meanwhile).
    let unknownOpcodes = Mutex(Set<HubOpcode>())
    /// Reads answered as stored blocks (opcode 49) and checked here, and replies whose bulk bytes
    /// the reading thread received straight into the caller's memory (SPEC.md §4).
    let storedBlockReads = Atomic<Int>(0)
    let directReceives = Atomic<Int>(0)
    public var storedBlockReadCount: Int { storedBlockReads.load(ordering: .relaxed) }
    /// Request data bytes sent from caller memory (`writeSlice(_:id:bytes:)`): in all, and of
    /// those, what went from that memory straight to the socket (the rest was copied and queued).
    public var payloadBytes: (all: Int, sentFromMemory: Int) {
        (payloadBytesAll.load(ordering: .relaxed), payloadBytesDirect.load(ordering: .relaxed))
    }
    let payloadBytesAll = Atomic<Int>(0)
    /// Whether `writeSlice` in a session on a zstd volume sends the object compressed
    /// (`writeObject`, SPEC.md §4, Compressed uploads).
    public let compressUploads: Bool
    /// Caller's ids of the open sessions whose volume compresses (zstd).
    let compressingSessions = Mutex(Set<SessionID>())
    /// Objects sent as compressed images, and their raw and image bytes (tests, status).
    public var compressedUploads: (objects: Int, rawBytes: Int, imageBytes: Int) {
        (compressedObjects.load(ordering: .relaxed), compressedRawBytes.load(ordering: .relaxed),
         compressedImageBytes.load(ordering: .relaxed))
    }
    let compressedObjects = Atomic<Int>(0)
    let compressedRawBytes = Atomic<Int>(0)
    let compressedImageBytes = Atomic<Int>(0)
    let payloadBytesDirect = Atomic<Int>(0)
    private let payloadWaitNs: UInt64
    private let sendBufferBytes: Int?
    public var directReceiveCount: Int { directReceives.load(ordering: .relaxed) }

    /// Whether reads try a co-located hub's store first (SPEC.md §4, Co-located reads); off
    /// unless set (the agent's mount sets it, `weft mount --local-reads`).
    public var localReads: Bool {
        get { localReadsWanted.load(ordering: .relaxed) }
        set { localReadsWanted.store(newValue, ordering: .relaxed) }
    }
    let localReadsWanted = Atomic<Bool>(false)
    /// The store opened for a connection; a new connection asks again.
    let localStoreState = Mutex(LocalStoreState())
    /// Held while the hub is asked for its store, so that concurrent callers wait for the
    /// answer rather than go over TCP meanwhile (`localStore`).
    let localStoreAsking = NSLock()
    let localReadsServed = Atomic<Int>(0)
    let localReadsFellBack = Atomic<Int>(0)
    /// Reads served from a co-located hub's store, and reads that tried it and went to the hub.
    public var localReadCount: Int { localReadsServed.load(ordering: .relaxed) }
    public var localReadFallbacks: Int { localReadsFellBack.load(ordering: .relaxed) }
    /// Whether uploads are written into a co-located hub's store and handed over (SPEC.md §4,
    /// Co-located writes); needs `localReads` (the store comes with it). Off unless set (the
    /// agent's mount sets it, `weft mount --local-writes`).
    public var localWrites: Bool {
        get { localWritesWanted.load(ordering: .relaxed) }
        set { localWritesWanted.store(newValue, ordering: .relaxed) }
    }
    let localWritesWanted = Atomic<Bool>(false)
    let localWritesServed = Atomic<Int>(0)
    let localWritesFellBack = Atomic<Int>(0)
    /// Until when (uptime ns) objects go over TCP after the store's disk was full.
    let localWritesPausedUntilNs = Atomic<UInt64>(0)
    /// Test hooks: run before an object's write into the store, and between that write and the
    /// hub's taking it over.
    var testBeforeLocalWrite: (@Sendable (SliceID, UInt32) -> Void)?
    var testBeforeAdopt: (@Sendable (SliceID, UInt32) -> Void)?
    /// Runs while the hub is asked for its store (`localStore`; tests).
    var testWhileAskingForLocalStore: (@Sendable () -> Void)?
    /// Objects the hub took over from the store, and objects that tried it and went over TCP.
    public var localWriteCount: Int { localWritesServed.load(ordering: .relaxed) }
    public var localWriteFallbacks: Int { localWritesFellBack.load(ordering: .relaxed) }
    /// Broadcast when a connection attempt ends, a connection is lost, or a request slot frees up.
    private let stateChanged = ConditionVariable()
    private var state = State.disconnected
    private var finishedConnectAttempts: UInt64 = 0
    private var lastConnectError: WeftError?
    /// Sessions opened through this client and not closed: caller's id → agent name and volume.
    private var sessions: [SessionID: (agentName: String, volume: String, data: Bool)] = [:]
    private var nextRequestID: UInt64 = 1
    /// Lease clients by the caller's session id (SPEC.md §12.6).
    private var leaseClients: [SessionID: LeaseClient] = [:]
    private var slotWaiters = 0
    /// Connections this client has begun, the number of the last one (guarded by `lock`).
    private var connectionsMade: UInt64
    /// Reading threads not yet ended, by identity (`close()` waits for them).
    private var readers: [ObjectIdentifier: ClientReader] = [:]

    /// `payloadWaitMs`: how long a request whose data goes from caller memory (`writeSlice`)
    /// waits for a full socket before the rest is copied and queued; `sendBufferBytes`: the
    /// socket's send buffer (default: the kernel's). Both for tests.
    public convenience init(address: HubAddress, connectTimeoutMs: Int = 5000, requestTimeoutMs: Int = 30000,
                payloadWaitMs: Int = 100, sendBufferBytes: Int? = nil, compressUploads: Bool = true, logger: Logger) {
        self.init(address: address, connectTimeoutMs: connectTimeoutMs, requestTimeoutMs: requestTimeoutMs,
                  payloadWaitMs: payloadWaitMs, sendBufferBytes: sendBufferBytes, clientID: UInt64.random(in: 1...UInt64.max),
                  compressUploads: compressUploads, logger: logger)
    }

    /// With a chosen `clientID` (tests: a client that stands in for another's next connection).
    init(address: HubAddress, connectTimeoutMs: Int = 5000, requestTimeoutMs: Int = 30000,
         payloadWaitMs: Int = 100, sendBufferBytes: Int? = nil, clientID: UInt64, firstConnection: UInt64 = 1,
         compressUploads: Bool = true, logger: Logger) {
        precondition(connectTimeoutMs > 0 && requestTimeoutMs > 0 && payloadWaitMs >= 0 && firstConnection > 0)
        self.compressUploads = compressUploads
        self.address = address
        self.clientID = clientID
        self.connectionsMade = firstConnection - 1
        self.connectTimeoutMs = connectTimeoutMs
        self.requestTimeoutMs = requestTimeoutMs
        self.payloadWaitNs = UInt64(payloadWaitMs) * 1_000_000
        self.sendBufferBytes = sendBufferBytes
        self.logger = logger
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    /// Closes the connection and stops the event loop thread. Calls in flight fail with EIO; later
    /// calls fail with ESHUTDOWN. Idempotent.
    public func close() {
        let (wasOpen, connection): (Bool, ClientConnection?) = lock.withLock {
            if case .closed = state { return (false, nil) }
            var current: ClientConnection?
            if case .connected(let connection) = state { current = connection }
            state = .closed
            stateChanged.broadcast()
            return (true, current)
        }
        guard wasOpen else { return }
        forgetLocalStore(nil)
        if let channel = connection?.channel { try? channel.close().wait() }
        // Every reading thread still running (that of the connection just closed, and any whose
        // connection was lost and that is winding down) ends before the event loop stops: a
        // reader closes its channel on that loop, and reports to the agent. (Not waited for on a
        // reading thread itself.)
        let running = lock.withLock { Array(readers.values) }
        for reader in running where !ClientReader.isReading(for: self) && reader !== ClientReader.current {
            if !reader.waitUntilDone(timeoutMs: 5000) {
                logger.warning("a hub connection's reading thread did not end within 5 s", metadata: ["hub": "\(address)"])
            }
        }
        try? group.syncShutdownGracefully()
    }

    deinit {
        if case .closed = state {} else { logger.warning("RemoteHub released without close(): its thread leaks") }
    }

    // MARK: Sessions

    public func openSession(agentName: String) throws -> (SessionID, VolumeInfo) {
        try openSession(agentName: agentName, volume: "")
    }

    /// The request that opens a session on `volume` ("" = the hub's only volume; a hub that is
    /// not in a cluster does not know `openVolumeSession`).
    private static func openRequest(_ agentName: String, _ volume: String, data: Bool) -> HubRequest {
        if data { return .openDataSession(agentName: agentName, volume: volume) }
        return volume.isEmpty ? .openSession(agentName: agentName) : .openVolumeSession(agentName: agentName, volume: volume)
    }

    public func openSession(agentName: String, volume: String) throws -> (SessionID, VolumeInfo) {
        try openSession(agentName: agentName, volume: volume, data: false)
    }

    /// Opens a data-only session (SPEC.md §12.5); reopened on reconnects like any other.
    public func openDataSession(agentName: String, volume: String) throws -> (SessionID, VolumeInfo) {
        try openSession(agentName: agentName, volume: volume, data: true)
    }

    private func openSession(agentName: String, volume: String, data: Bool) throws -> (SessionID, VolumeInfo) {
        guard agentName.utf8.count <= WireCodec.stringMaxBytes, volume.utf8.count <= WireCodec.stringMaxBytes else {
            throw WeftError(ENAMETOOLONG, "agent or volume name longer than \(WireCodec.stringMaxBytes) bytes")
        }
        // A second round only if the connection dropped right after the hub answered; the hub
        // closes that session with the connection.
        for _ in 0..<2 {
            let connection = try liveConnection()
            let request = Self.openRequest(agentName, volume, data: data)
            guard case let .session(liveID, info) = try send(request, on: connection, substituteSession: false) else {
                throw shapeMismatch(request.opcode)
            }
            let callerID: SessionID? = lock.withLock {
                guard connection.isOpen, case .connected(let current) = state, current === connection else { return nil }
                var id = liveID
                while sessions[id] != nil { id &+= 1 }
                sessions[id] = (agentName, volume, data)
                connection.liveSessions[id] = liveID
                return id
            }
            if let callerID {
                if info.compression == .zstd { compressingSessions.withLock { _ = $0.insert(callerID) } }
                return (callerID, info)
            }
        }
        throw WeftError(EIO, "connection to hub \(address.displayName) lost while opening a session")
    }

    public func closeSession(_ session: SessionID) throws {
        enum Plan { case forget, closeLive(ClientConnection, SessionID), passThrough }
        let plan: Plan = lock.withLock {
            leaseClients[session] = nil
            guard sessions.removeValue(forKey: session) != nil else { return .passThrough }
            compressingSessions.withLock { _ = $0.remove(session) }
            if case .connected(let connection) = state, let liveID = connection.liveSessions.removeValue(forKey: session) {
                return .closeLive(connection, liveID)
            }
            // Not connected: the hub closed the session when the connection ended.
            return .forget
        }
        switch plan {
        case .forget:
            return
        case let .closeLive(connection, liveID):
            do {
                _ = try send(.closeSession(liveID), on: connection, substituteSession: false)
            } catch let error as WeftError where error.errno == EIO {
                // The connection ended: the hub closes the session itself.
            }
        case .passThrough:
            _ = try call(.closeSession(session))
        }
    }

    // MARK: Requests

    /// Sends `request` on the live connection (connecting first if needed) and waits for its result.
    func call(_ request: HubRequest) throws -> HubResponse {
        try call(request, encode: Self.encodeRequest, decode: Self.decodeResponse)
    }

    /// Encodes a request frame; the request passed is the one to send (its session substituted).
    typealias Encoder = (_ id: UInt64, _ request: HubRequest, _ allocator: ByteBufferAllocator) throws -> ByteBuffer
    /// Decodes a response payload: throws if malformed, returns the hub's error as a failure.
    typealias Decoder<R> = (_ opcode: HubOpcode, _ payload: ByteBuffer) throws -> Result<R, WeftError>
    /// A bulk reply received straight into `destination` (`BulkSink`): `decode` gets the payload's
    /// head (before the bulk bytes) and tail (after them).
    struct DirectDecoder<R> {
        var shape: BulkSink.Shape
        var destination: UnsafeMutableRawBufferPointer
        var decode: (_ head: UnsafeRawBufferPointer, _ tail: UnsafeRawBufferPointer) throws -> Result<R, WeftError>
    }

    static func encodeRequest(id: UInt64, request: HubRequest, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        try WireCodec.requestBuffer(id: id, request, allocator: allocator)
    }

    static func decodeResponse(opcode: HubOpcode, payload: ByteBuffer) throws -> Result<HubResponse, WeftError> {
        try WireCodec.decodeResponse(opcode: opcode, payload: payload)
    }

    /// `call` with its own frame encoding and response decoding (bulk transfers).
    /// With `decodeOnLoop` the event loop runs `decode` as the response arrives (the caller's
    /// memory it writes to stays valid: the caller waits, and a timed-out call is no longer
    /// pending, so its response is dropped).
    ///
    /// With `direct` the reading thread may receive a large reply's bulk bytes straight into
    /// `direct.destination` and then call `direct.decode` with the payload's head and tail
    /// instead (SPEC.md §4, Agent reading thread); `decode` still serves a reply that arrives whole.
    ///
    /// With `payload` the frame `encode` makes is only its start: the request's last `payload.count`
    /// bytes follow from that memory (`DirectSender.send(_:payload:)`), read only during the call.
    func call<R>(_ request: HubRequest, encode: Encoder, decode: @escaping Decoder<R>, decodeOnLoop: Bool = false,
                 direct: DirectDecoder<R>? = nil, payload: UnsafeRawBufferPointer? = nil) throws -> R {
        // A request whose connection closed before it was sent is sent once more on a new one.
        do {
            return try send(request, on: try liveConnection(), encode: encode, decode: decode, decodeOnLoop: decodeOnLoop,
                            direct: direct, payload: payload)
        } catch is NotSent {
            do {
                return try send(request, on: try liveConnection(), encode: encode, decode: decode,
                                decodeOnLoop: decodeOnLoop, direct: direct, payload: payload)
            } catch is NotSent {
                throw WeftError(EIO, "connection to hub \(address.displayName) lost")
            }
        }
    }

    private struct NotSent: Error {}

    /// Sends `request` on `connection` and blocks until its response or `requestTimeoutMs`.
    /// Throws `NotSent` if the connection was already closed.
    private func send(_ request: HubRequest, on connection: ClientConnection, substituteSession: Bool = true) throws -> HubResponse {
        try send(request, on: connection, substituteSession: substituteSession, encode: Self.encodeRequest,
                 decode: Self.decodeResponse)
    }

    private func send<R>(_ request: HubRequest, on connection: ClientConnection, substituteSession: Bool = true,
                         encode: Encoder, decode: @escaping Decoder<R>, decodeOnLoop: Bool = false,
                         direct: DirectDecoder<R>? = nil, payload: UnsafeRawBufferPointer? = nil) throws -> R {
        if ClientReader.isReading(for: self) {
            throw WeftError(EDEADLK, "RemoteHub called on a connection's reading thread")
        }
        let waiter = currentWaiter()
        let opcode = request.opcode
        // With `decodeOnLoop`: what the event loop decoded (guarded by `lock`).
        var decoded: Result<Result<R, WeftError>, Error>?
        let deadlineNs = MonotonicClock.deadlineNs(afterMs: requestTimeoutMs)

        // Register: take a slot and an id, substitute the live session.
        let (id, wireRequest, channel, sender): (UInt64, HubRequest, Channel, DirectSender) = try lock.withLock {
            while connection.isOpen && connection.pending.count >= Self.maxInFlightRequests {
                slotWaiters += 1
                defer { slotWaiters -= 1 }
                if !stateChanged.wait(lock, deadlineNs: deadlineNs) { throw timedOut(opcode) }
            }
            guard connection.isOpen, let channel = connection.channel, let sender = connection.sender else { throw NotSent() }
            let id = nextRequestID
            nextRequestID &+= 1
            waiter.outcome = nil
            waiter.consume = nil
            waiter.sink = nil
            if decodeOnLoop {
                waiter.consume = { frame in
                    decoded = Result { try decode(opcode, frame.payload) }
                }
                if let direct {
                    waiter.sink = BulkSink(shape: direct.shape, opcode: opcode, destination: direct.destination) { head, tail in
                        decoded = Result { try direct.decode(head, tail) }
                    }
                }
            }
            connection.pending[id] = waiter
            var wireRequest = request
            if substituteSession, let session = request.session, let liveID = connection.liveSessions[session], liveID != session {
                wireRequest = request.withSession(liveID)
            }
            return (id, wireRequest, channel, sender)
        }
        if channel.eventLoop.inEventLoop {
            abandon(id, on: connection)
            throw WeftError(EDEADLK, "RemoteHub called on its own event loop")
        }

        let buffer: ByteBuffer
        do {
            buffer = try encode(id, wireRequest, channel.allocator)
        } catch {
            abandon(id, on: connection)
            throw error
        }
        if let payload {
            let sentFromMemory = sender.send(buffer, payload: payload)
            payloadBytesAll.add(payload.count, ordering: .relaxed)
            payloadBytesDirect.add(sentFromMemory, ordering: .relaxed)
        } else {
            sender.send(buffer)
        }

        let frame: InboundFrame = try lock.withLock {
            // However the wait ends, the reading thread must be done with this caller's memory.
            defer { waitUntilNotReceiving(waiter) }
            while waiter.outcome == nil {
                if !waiter.wakeup.wait(lock, deadlineNs: deadlineNs), waiter.outcome == nil {
                    connection.pending.removeValue(forKey: id)
                    slotFreed()
                    throw timedOut(opcode)
                }
            }
            defer {
                waiter.outcome = nil
                waiter.consume = nil
                waiter.sink = nil
            }
            return try waiter.outcome!.get()
        }

        guard frame.header.opcode == opcode.rawValue else {
            throw protocolViolation(on: channel, "response to \(opcode) request \(id) carries opcode \(frame.header.opcode)")
        }
        let result: Result<R, WeftError>
        do {
            if decodeOnLoop {
                result = try lock.withLock { decoded }!.get()
            } else {
                result = try decode(opcode, frame.payload)
            }
        } catch {
            throw protocolViolation(on: channel, "malformed \(opcode) response: \(error)")
        }
        return try result.get()
    }

    /// Waits (with `lock` held) until the reading thread no longer writes into `waiter`'s memory:
    /// at most one `recv` of `ClientReader.directPieceBytes`, as it checks before each.
    private func waitUntilNotReceiving(_ waiter: ResponseWaiter) {
        while waiter.receiving {
            _ = waiter.wakeup.wait(lock, deadlineNs: MonotonicClock.deadlineNs(afterMs: 1000))
        }
    }

    /// The sink of the caller that waits for the response `header` starts, if it has one for
    /// that opcode (on the reading thread).
    func sink(for header: FrameHeader, on connection: ClientConnection) -> (ResponseWaiter, BulkSink)? {
        lock.withLock {
            guard let waiter = connection.pending[header.requestID], let sink = waiter.sink,
                  sink.opcode.rawValue == header.opcode else { return nil }
            return (waiter, sink)
        }
    }

    /// Runs `body`, which writes into `waiter`'s memory, if its request `id` is still pending,
    /// marked as receiving meanwhile; false (and `body` not run) if the caller stopped waiting.
    func writing(into waiter: ResponseWaiter, id: UInt64, on connection: ClientConnection, _ body: () -> Void) -> Bool {
        let live: Bool = lock.withLock {
            guard connection.pending[id] === waiter else { return false }
            waiter.receiving = true
            return true
        }
        guard live else { return false }
        body()
        lock.withLock {
            waiter.receiving = false
            // A caller that stopped waiting meanwhile waits for this write to end.
            if connection.pending[id] !== waiter { waiter.wakeup.signal() }
        }
        return true
    }

    /// A reading thread has ended.
    func readerEnded(_ reader: ClientReader) {
        lock.withLock { _ = readers.removeValue(forKey: ObjectIdentifier(reader)) }
    }

    /// Completes the request whose bulk bytes the reading thread received into its caller's memory.
    func finishDirect(_ waiter: ResponseWaiter, header: FrameHeader, head: [UInt8], tail: [UInt8],
                      on connection: ClientConnection) {
        lock.withLock {
            guard connection.pending[header.requestID] === waiter else { return }
            directReceives.add(1, ordering: .relaxed)
            connection.pending.removeValue(forKey: header.requestID)
            head.withUnsafeBytes { head in tail.withUnsafeBytes { tail in waiter.sink?.finish(head, tail) } }
            waiter.outcome = .success(InboundFrame(header: header, payload: ByteBuffer()))
            waiter.wakeup.signal()
            slotFreed()
        }
    }

    private func currentWaiter() -> ResponseWaiter {
        if let waiter = waiters.currentValue { return waiter }
        let waiter = ResponseWaiter()
        waiters.currentValue = waiter
        return waiter
    }

    private func abandon(_ id: UInt64, on connection: ClientConnection) {
        lock.withLock {
            connection.pending.removeValue(forKey: id)
            slotFreed()
        }
    }

    /// Call with `lock` held, after removing a pending request.
    private func slotFreed() {
        if slotWaiters > 0 { stateChanged.broadcast() }
    }

    private func timedOut(_ opcode: HubOpcode) -> WeftError {
        WeftError(ETIMEDOUT, "hub \(address.displayName) did not answer \(opcode.name) within \(requestTimeoutMs) ms")
    }

    /// Closes the connection and returns the error for the caller to throw.
    private func protocolViolation(on channel: Channel, _ problem: String) -> WeftError {
        logger.error("closing hub connection: protocol violation", metadata: ["hub": "\(address)", "problem": "\(problem)"])
        channel.close(promise: nil)
        return WeftError(EIO, "hub \(address.displayName) broke the wire protocol: \(problem)")
    }

    /// Sends `request` and unpacks its result; to a hub that answered its opcode with ENOSYS (one
    /// older than the method), runs `fallback` instead, from then on.
    func call<T>(_ request: HubRequest, unpack: (HubResponse) -> T?, fallback: () throws -> T) throws -> T {
        let opcode = request.opcode
        if !unknownOpcodes.withLock({ $0.contains(opcode) }) {
            do {
                guard let result = unpack(try call(request)) else { throw shapeMismatch(opcode) }
                return result
            } catch let error as WeftError where error.errno == ENOSYS {
                unknownOpcodes.withLock { _ = $0.insert(opcode) }
            }
        }
        return try fallback()
    }

    func shapeMismatch(_ opcode: HubOpcode) -> WeftError {
        WeftError(EIO, "hub \(address.displayName) answered \(opcode.name) with the wrong result shape")
    }

    // MARK: Events from the connection's event loop

    /// Completes the request `frame` answers. Returns false if the frame is not a response
    /// (the caller closes the connection).
    func deliver(_ frame: InboundFrame, on connection: ClientConnection) -> Bool {
        if frame.header.kind == .callback { return receiveCallback(frame, on: connection) }
        if frame.header.kind == .response && frame.header.requestID == Self.pingRequestID {
            // The hub was alive when that ping left: leases are good until then + validity.
            lock.withLock {
                if !connection.pingsSentNs.isEmpty { connection.confirmedNs = connection.pingsSentNs.removeFirst() }
            }
            return true
        }
        guard frame.header.kind == .response else {
            logger.error("closing hub connection: the hub sent a request frame", metadata: ["hub": "\(address)"])
            return false
        }
        lock.withLock {
            // No waiter: the request timed out and its answer is dropped.
            guard let waiter = connection.pending.removeValue(forKey: frame.header.requestID) else { return }
            if let consume = waiter.consume {
                consume(frame)
                waiter.outcome = .success(InboundFrame(header: frame.header, payload: ByteBuffer()))
            } else {
                waiter.outcome = .success(frame)
            }
            waiter.wakeup.signal()
            slotFreed()
        }
        return true
    }

    /// Fails every request in flight on `connection`; the next call reconnects.
    func connectionLost(_ connection: ClientConnection) {
        let clients = lock.withLock { connection.isOpen ? Array(leaseClients.values) : [] }
        Self.reportLeasesLost(clients)
        let wasCurrent: Bool = lock.withLock {
            guard connection.isOpen else { return false }
            connection.isOpen = false
            let lost = WeftError(EIO, "connection to hub \(address.displayName) lost")
            for waiter in connection.pending.values {
                waiter.outcome = .failure(lost)
                waiter.wakeup.signal()
            }
            connection.pending.removeAll()
            stateChanged.broadcast()
            if case .connected(let current) = state, current === connection {
                state = .disconnected
                return true
            }
            return false
        }
        // After the state changed: no read takes this connection's store up again.
        forgetLocalStore(connection)
        if wasCurrent { logger.warning("connection to hub lost; the next call reconnects", metadata: ["hub": "\(address)"]) }
    }

    // MARK: Connecting

    /// The connection in use, if connected (no attempt to connect).
    func currentConnection() -> ClientConnection? {
        lock.withLock {
            if case .connected(let connection) = state { return connection }
            return nil
        }
    }

    /// The open connection, connecting (once, for all waiting threads) if there is none.
    private func liveConnection() throws -> ClientConnection {
        // Before connecting: a connection's reading thread must never wait for a reply.
        if ClientReader.isReading(for: self) {
            throw WeftError(EDEADLK, "RemoteHub called on a connection's reading thread")
        }
        lock.lock()
        switch state {
        case .closed:
            lock.unlock()
            throw WeftError(ESHUTDOWN, "RemoteHub for \(address.displayName) is closed")
        case .connected(let connection):
            lock.unlock()
            return connection
        case .connecting:
            // Share the attempt under way rather than starting another.
            let attempt = finishedConnectAttempts
            // The attempt's own bound: the connection, the fence, and each session it reopens.
            let deadlineNs = MonotonicClock.deadlineNs(afterMs: connectTimeoutMs + (2 + sessions.count) * requestTimeoutMs)
            while finishedConnectAttempts == attempt, case .connecting = state {
                if !stateChanged.wait(lock, deadlineNs: deadlineNs) { break }
            }
            defer { lock.unlock() }
            switch state {
            case .connected(let connection): return connection
            case .closed: throw WeftError(ESHUTDOWN, "RemoteHub for \(address.displayName) is closed")
            case .connecting, .disconnected: throw lastConnectError ?? doesNotAnswer("no connection")
            }
        case .disconnected:
            state = .connecting
            lock.unlock()
        }

        let result = Result { try establishConnection() }

        var orphans: [SessionID] = []
        let outcome: Result<ClientConnection, WeftError> = lock.withLock {
            finishedConnectAttempts &+= 1
            defer { stateChanged.broadcast() }
            if case .closed = state {
                return .failure(WeftError(ESHUTDOWN, "RemoteHub for \(address.displayName) is closed"))
            }
            switch result {
            case .success(let connection) where connection.isOpen:
                // Sessions closed by the caller while this connection was being set up.
                for (callerID, liveID) in connection.liveSessions where sessions[callerID] == nil {
                    connection.liveSessions.removeValue(forKey: callerID)
                    orphans.append(liveID)
                }
                state = .connected(connection)
                lastConnectError = nil
                return .success(connection)
            case .success:
                let error = WeftError(EIO, "connection to hub \(address.displayName) lost while connecting")
                state = .disconnected
                lastConnectError = error
                return .failure(error)
            case .failure(let error):
                let error = error as? WeftError ?? doesNotAnswer("\(error)")
                state = .disconnected
                lastConnectError = error
                return .failure(error)
            }
        }
        switch (outcome, result) {
        case (.success(let connection), _):
            for liveID in orphans {
                _ = try? send(.closeSession(liveID), on: connection, substituteSession: false)
            }
            return connection
        case (.failure(let error), .success(let connection)):
            connection.channel?.close(promise: nil)
            throw error
        case (.failure(let error), .failure):
            throw error
        }
    }

    /// Connects and reopens every remembered session on the new connection. Bounded by
    /// `connectTimeoutMs` for the connection and `requestTimeoutMs` per reopened session.
    private func establishConnection() throws -> ClientConnection {
        let connection = ClientConnection(expectedInFlight: 64)
        // Weft connects the socket itself, sends on a duplicate (SPEC.md §4, Direct sends) and
        // reads another on a thread of its own (Agent reading thread). NIO only writes what a
        // direct send could not: an output-only channel, which never reads the socket.
        let descriptor: Int32
        do {
            descriptor = try Sockets.connect(address, timeoutMs: connectTimeoutMs)
        } catch {
            throw doesNotAnswer(describeConnectFailure(error))
        }
        Sockets.setSendBuffer(descriptor, bytes: sendBufferBytes)
        connection.localEndpoint = Sockets.localName(descriptor)
        let sending = Sockets.duplicate(descriptor)
        let reading = sending >= 0 ? Sockets.duplicate(descriptor) : -1
        guard reading >= 0 else {
            let reason = String(cString: strerror(errno))
            if sending >= 0 { Glibc.close(sending) }
            Glibc.close(descriptor)
            throw doesNotAnswer(reason)
        }
        let channel: Channel
        do {
            channel = try NIOPipeBootstrap(group: group)
                .channelOption(ChannelOptions.allocator, value: BulkMemory.allocator)
                .takingOwnershipOfDescriptor(output: descriptor).wait()
        } catch {
            Glibc.close(sending)
            Glibc.close(reading)
            throw doesNotAnswer(describeConnectFailure(error))
        }
        let sender = DirectSender(descriptor: sending, channel: channel, spanWaitMaxNs: payloadWaitNs)
        let reader = ClientReader(descriptor: reading, hub: self, connection: connection, allocator: channel.allocator)
        lock.withLock {
            connection.channel = channel
            connection.sender = sender
            connection.reader = reader
            readers[ObjectIdentifier(reader)] = reader
        }
        channel.closeFuture.whenComplete { [self] _ in
            // Calls in flight fail at once; the reading thread reads what the socket still holds, then ends.
            connectionLost(connection)
            reader.stop()
        }
        reader.start()
        let heartbeat = channel.eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(Int64(Self.heartbeatMs)),
                                                               delay: .milliseconds(Int64(Self.heartbeatMs))) { [self] _ in
            guard channel.isActive, let ping = try? WireCodec.requestBuffer(id: Self.pingRequestID, .ping,
                                                                             allocator: channel.allocator) else { return }
            let now = MonotonicClock.nowNs()
            let expired: [LeaseClient] = lock.withLock {
                connection.pingsSentNs.append(now)
                if connection.pingsSentNs.count > 64 { connection.pingsSentNs.removeFirst() }
                guard now &- connection.confirmedNs > Leases.agentValidityNs else { return [] }
                return Array(leaseClients.values)
            }
            // No answer from the hub for too long: this agent's leases may already be void there.
            Self.reportLeasesLost(expired)
            // Not on the loop: a writeSlice may hold the sender while it waits for a full socket
            // (up to `payloadWaitMs`), and loop code never waits for a sender.
            DispatchQueue.global().async { sender.send(ping) }
        }
        channel.closeFuture.whenComplete { _ in heartbeat.cancel() }

        // Before anything else on it: the hub drops what earlier connections sent and has not
        // started, so nothing the agent gave up on runs after what it sends next (SPEC.md §4, Fences).
        // Asked on every connection, also after an ENOSYS: the hub may have been upgraded since.
        let number = lock.withLock {
            connectionsMade += 1
            return connectionsMade
        }
        do {
            guard case .empty = try send(.fence(client: clientID, connection: number), on: connection,
                                         substituteSession: false) else { throw shapeMismatch(.fence) }
        } catch let error as WeftError where error.errno == ENOSYS {
            // A hub older than opcode 51: no fences (SPEC.md §4, Fences).
        } catch {
            // ETIMEDOUT stays (a hub that accepts and never answers); anything else is the
            // connection failing (EIO), whatever the hub answered (its ESTALE is not a file's).
            channel.close(promise: nil)
            let errno = (error as? WeftError)?.errno == ETIMEDOUT ? ETIMEDOUT : EIO
            throw WeftError(errno, "hub \(address.displayName) did not fence the earlier connections: \(error)")
        }
        // A new connection may reach an upgraded hub: methods it refused before are asked again
        // (one ENOSYS per opcode and connection at most).
        if number > 1 { unknownOpcodes.withLock { $0.removeAll() } }
        let toReopen = lock.withLock { sessions }
        for (callerID, (agentName, volume, data)) in toReopen {
            do {
                let request = Self.openRequest(agentName, volume, data: data)
                guard case let .session(liveID, _) = try send(request, on: connection, substituteSession: false) else {
                    throw shapeMismatch(request.opcode)
                }
                let client = lock.withLock {
                    connection.liveSessions[callerID] = liveID
                    return leaseClients[callerID]
                }
                if let client {
                    guard case .empty = try send(.enableLeases(liveID), on: connection, substituteSession: false) else {
                        throw shapeMismatch(.enableLeases)
                    }
                    // Writes buffered under a write lease the old connection held: take it back
                    // before any other call (a restarted home waits for these, SPEC.md §12.6).
                    let context = RequestContext(session: liveID, credentials: .root)
                    for ino in client.reclaimableWriteLeases() {
                        let reply = try send(.reclaimWriteLease(context, ino: ino), on: connection, substituteSession: false)
                        guard case let .flag(granted) = reply else { throw shapeMismatch(.reclaimWriteLease) }
                        client.writeLeaseReclaimed(ino, granted: granted)
                    }
                }
            } catch {
                channel.close(promise: nil)
                throw WeftError(EIO, "hub \(address.displayName): cannot reopen the session of '\(agentName)': \(error)")
            }
        }
        logger.info("connected to hub", metadata: ["hub": "\(address)", "reopenedSessions": "\(toReopen.count)"])
        return connection
    }

    private func doesNotAnswer(_ cause: String) -> WeftError {
        WeftError(EIO, "hub \(address.displayName) does not answer (\(cause))")
    }

    private func describeConnectFailure(_ error: Error) -> String {
        if let failure = error as? Sockets.ConnectFailure { return failure.reason }
        if case ChannelError.connectTimeout = error { return "no connection within \(connectTimeoutMs) ms" }
        if let error = error as? NIOConnectionError {
            if let failure = error.connectionErrors.first { return describeConnectFailure(failure.error) }
            if let dns = error.dnsAError ?? error.dnsAAAAError { return "cannot resolve \(error.host): \(dns)" }
        }
        if let error = error as? IOError { return String(cString: strerror(error.errnoCode)) }
        return "\(error)"
    }
}

// MARK: Leases (SPEC.md §12.6)

extension RemoteHub {
    public func enableLeases(_ session: SessionID, client: LeaseClient) throws {
        lock.withLock { leaseClients[session] = client }
        do {
            guard case .empty = try call(.enableLeases(session)) else { throw shapeMismatch(.enableLeases) }
        } catch {
            lock.withLock { leaseClients[session] = nil }
            throw error
        }
    }

    public func acquireWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool {
        guard case let .flag(granted) = try call(.acquireWriteLease(context, ino: ino)) else {
            throw shapeMismatch(.acquireWriteLease)
        }
        return granted
    }

    /// Tells `clients` their leases are void, at once (before any reconnect can reclaim).
    static func reportLeasesLost(_ clients: [LeaseClient]) {
        for client in clients { client.leasesLost() }
    }

    /// A `recall` from the hub (on the event loop). A notice is handed over at once, so that the
    /// reply that follows it on this connection is not cached. A recall (which may commit
    /// buffered writes through this very connection) runs off the loop and is answered when done;
    /// a reply the hub computes after sending it, while its change is under way, comes with a
    /// notice of its own.
    func receiveCallback(_ frame: InboundFrame, on connection: ClientConnection) -> Bool {
        guard frame.header.opcode == HubOpcode.recall.rawValue,
              case let .recall(live, ino, names, notice)? = try? WireCodec.decodeRequest(opcode: .recall, payload: frame.payload)
        else {
            logger.error("closing hub connection: malformed callback frame", metadata: ["hub": "\(address)"])
            return false
        }
        let (client, channel, sender): (LeaseClient?, Channel?, DirectSender?) = lock.withLock {
            let caller = connection.liveSessions.first { $0.value == live }?.key
            return (caller.flatMap { leaseClients[$0] }, connection.channel, connection.sender)
        }
        if notice {
            _ = client?.recall(ino, names: names, notice: true, deadlineNs: 0)
            return true
        }
        guard let channel, let sender else { return true }
        let id = frame.header.requestID
        // Off the loop, on a thread of its own: the recall may commit buffered writes (round
        // trips) and must not wait behind other blocking work.
        WorkerPool.detach {
            _ = client?.recall(ino, names: names, notice: false, deadlineNs: UInt64.max)
            let answer = WireCodec.responseBuffer(id: id, rawOpcode: HubOpcode.recall.rawValue, .success(.empty),
                                                  allocator: channel.allocator)
            sender.send(answer)
        }
        return true
    }
}
