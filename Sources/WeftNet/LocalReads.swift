#if canImport(Glibc)
import Glibc
#endif
import CWeftSupport
import Foundation
import Logging
import Synchronization
import WeftChunks
import WeftProto

/// The hub's side of co-located reads (SPEC.md §4, Co-located reads): an abstract Unix socket
/// with a random name that hands the chunk store's directory descriptor, opened once when the
/// offer is made, to a peer running as root or as this process's user. One thread accepts and
/// answers each handshake in turn (one per agent connection, a few bytes each): a peer of
/// another user is closed before anything is read from it, and any peer gets at most
/// `handshakeTimeoutMs` in all to send its request.
public final class LocalReadServer: @unchecked Sendable {
    public static let namePrefix = "weft-local-reads-"
    static let request = Array("WEFTLR01".utf8)
    static let replyMagic = Array("WEFTLR".utf8)
    static let replyBytes = 8
    static let handshakeTimeoutMs = 1_000

    /// The socket's abstract name (without the leading NUL).
    public let name: String
    /// Device and inode of the directory handed out, and this machine's boot id: the agent
    /// checks them (`LocalReadClient.openStore`).
    let device: UInt64
    let inode: UInt64
    let bootID: String
    private let directory: Int32
    private let logger: Logger
    private let listener: Int32
    private let stopping = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private let handshakes = Atomic<Int>(0)
    /// When a refusal to another user was last logged, and how many went unlogged since.
    private var refusalLoggedNs: UInt64 = 0
    private var refusalsUnlogged = 0
    static let refusalLogIntervalNs: UInt64 = 60_000_000_000

    /// Handshakes answered with the descriptor so far (counted before the reply goes out).
    public var handshakeCount: Int { handshakes.load(ordering: .relaxed) }

    /// Opens `chunkDirectory` (the chunk store's), binds the socket and starts answering.
    public init(chunkDirectory: String, logger: Logger) throws {
        directory = open(chunkDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard directory >= 0 else { throw WeftError(errno, "cannot open \(chunkDirectory): \(String(cString: strerror(errno)))") }
        var status = stat()
        guard fstat(directory, &status) == 0, let bootID = LocalReadClient.bootID() else {
            close(directory)
            throw WeftError(EIO, "cannot tell \(chunkDirectory)'s identity or this machine's boot id")
        }
        device = UInt64(status.st_dev)
        inode = UInt64(status.st_ino)
        self.bootID = bootID
        var random = SystemRandomNumberGenerator()
        let suffix = (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &random)) }.joined()
        name = Self.namePrefix + suffix
        self.logger = logger
        listener = weft_listen_abstract(name, 64)
        guard listener >= 0 else {
            let code = errno
            close(directory)
            throw WeftError(code, "cannot bind the co-located reads socket: \(String(cString: strerror(code)))")
        }
        Thread.detachNewThread { [self] in
            acceptLoop()
            finished.signal()
        }
    }

    /// What opcode 56 answers a connection whose peer is `peer`.
    func offer(peer: String) -> LocalReadClient.Offer {
        LocalReadClient.Offer(name: name, peer: peer, bootID: bootID, device: device, inode: inode)
    }

    /// Stops answering and closes the socket. Call once.
    public func stop() {
        stopping.store(true, ordering: .relaxed)
        shutdown(listener, Int32(SHUT_RDWR))
        finished.wait()
        close(listener)
        close(directory)
    }

    private func acceptLoop() {
        while let accepted = Sockets.accept(listener, stopping: { stopping.load(ordering: .relaxed) }) {
            switch accepted {
            case .success(let peer):
                answer(peer)
                close(peer)
            case .failure(let error):
                logger.error("co-located reads: no longer accepting", metadata: ["error": "\(error)"])
                return
            }
        }
    }

    /// Checks the peer's user, reads the request and replies, with the store's descriptor when
    /// all is well.
    private func answer(_ peer: Int32) {
        var uid: UInt32 = 0
        guard weft_peer_uid(peer, &uid) == 0 else { return }
        guard uid == 0 || uid == geteuid() else {
            // Any local user can find the name (/proc/net/unix) and knock: one line a minute.
            let now = MonotonicClock.nowNs()
            if refusalLoggedNs == 0 || now - refusalLoggedNs >= Self.refusalLogIntervalNs {
                logger.notice("co-located reads refused to a process of another user",
                              metadata: ["uid": "\(uid)", "unlogged": "\(refusalsUnlogged)"])
                refusalLoggedNs = now
                refusalsUnlogged = 0
            } else {
                refusalsUnlogged += 1
            }
            reply(peer, errno: EPERM, descriptor: -1)
            return
        }
        var received = [UInt8](repeating: 0, count: Self.request.count)
        let deadline = MonotonicClock.deadlineNs(afterMs: Self.handshakeTimeoutMs)
        let got = received.withUnsafeMutableBytes { Sockets.receiveFully(peer, $0, deadlineNs: deadline) }
        guard got == Self.request.count, received == Self.request else {
            reply(peer, errno: got == Self.request.count ? EPROTO : ETIMEDOUT, descriptor: -1)
            return
        }
        handshakes.add(1, ordering: .relaxed)
        reply(peer, errno: 0, descriptor: directory)
    }

    @discardableResult
    private func reply(_ peer: Int32, errno code: Int32, descriptor: Int32) -> Bool {
        var bytes = Self.replyMagic
        bytes.append(UInt8(truncatingIfNeeded: code))
        bytes.append(UInt8(truncatingIfNeeded: code >> 8))
        let sent = bytes.withUnsafeBytes { weft_send_with_descriptor(peer, $0.baseAddress, $0.count, descriptor) }
        return sent == bytes.count
    }
}

/// The agent's side: asks its hub over a connection, checks that nothing stands between them
/// and that they share a machine, and opens the hub's chunk store for reading (SPEC.md §4,
/// Co-located reads).
enum LocalReadClient {
    /// The reply of opcode 56.
    struct Offer: Equatable {
        /// The abstract socket's name.
        var name: String
        /// This connection's other end as the hub sees it.
        var peer: String
        /// The hub machine's boot id (`/proc/sys/kernel/random/boot_id`).
        var bootID: String
        /// Device and inode of the directory the socket hands out.
        var device: UInt64
        var inode: UInt64

        func encoded() -> [UInt8] {
            var writer = ByteWriter()
            writer.string(name)
            writer.string(peer)
            writer.string(bootID)
            writer.u64(device)
            writer.u64(inode)
            return writer.bytes
        }

        static func decode(_ bytes: [UInt8]) throws -> Offer {
            try bytes.withUnsafeBytes { raw in
                var reader = ByteReader(raw)
                let offer = Offer(name: try reader.string(max: 107), peer: try reader.string(max: 128),
                                  bootID: try reader.string(max: 64), device: try reader.u64(), inode: try reader.u64())
                guard reader.isAtEnd else { throw WeftError(EBADMSG, "trailing bytes after a localReads reply") }
                return offer
            }
        }
    }

    /// This machine's boot id: two processes that read the same one run on one kernel.
    static func bootID() -> String? {
        guard let text = try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8) else { return nil }
        let id = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return id.isEmpty ? nil : id
    }

    /// A socket's end as `Sockets.peerName` and `localName` give it, if it is an IP address
    /// and port (not a Unix socket, not unknown).
    static func endpoint(_ name: String) -> String? {
        name.hasSuffix("peer") || name.isEmpty ? nil : name
    }

    /// Why co-located reads cannot be used on a connection.
    struct Refusal: Error, CustomStringConvertible {
        let description: String
    }

    /// Connects to the offered socket and receives the store's directory; throws `Refusal`
    /// when the hub is not this process's direct peer on this machine, or the handshake fails.
    static func openStore(_ offer: Offer, localEndpoint: String?, logger: Logger) throws -> ChunkStore {
        guard let localEndpoint, localEndpoint == offer.peer else {
            throw Refusal(description: "the hub sees this connection come from \(offer.peer), not \(localEndpoint ?? "an IP address"): something relays it")
        }
        guard let bootID = bootID(), bootID == offer.bootID else {
            throw Refusal(description: "the hub runs on another machine (boot id \(offer.bootID))")
        }
        guard offer.name.hasPrefix(LocalReadServer.namePrefix) else {
            throw Refusal(description: "the hub offered an unexpected socket name")
        }
        // Longer than the hub gives a peer: a stalled peer ahead of this one must not time it out.
        let socket = weft_connect_abstract(offer.name, Int32(3 * LocalReadServer.handshakeTimeoutMs))
        guard socket >= 0 else {
            let code = errno
            throw Refusal(description: code == EAGAIN
                              ? "the hub's socket did not accept within \(3 * LocalReadServer.handshakeTimeoutMs) ms"
                              : "cannot connect to the hub's socket (\(String(cString: strerror(code)))): another network namespace?")
        }
        defer { close(socket) }
        let request = LocalReadServer.request
        let sent = request.withUnsafeBytes { weft_send_with_descriptor(socket, $0.baseAddress, $0.count, -1) }
        guard sent == request.count else { throw Refusal(description: "cannot send the request: \(String(cString: strerror(errno)))") }
        var reply = [UInt8](repeating: 0, count: LocalReadServer.replyBytes)
        var descriptor: Int32 = -1
        let got = reply.withUnsafeMutableBytes { weft_receive_with_descriptor(socket, $0.baseAddress, $0.count, &descriptor) }
        let failure = got < 0 ? errno : 0
        guard got == reply.count, Array(reply[0..<6]) == LocalReadServer.replyMagic else {
            if descriptor >= 0 { close(descriptor) }
            throw Refusal(description: failure == EAGAIN || failure == EWOULDBLOCK
                              ? "the hub's socket did not answer within \(3 * LocalReadServer.handshakeTimeoutMs) ms"
                              : "the hub's socket gave no valid answer (\(failure == 0 ? "\(got) bytes" : String(cString: strerror(failure))))")
        }
        let code = Int32(reply[6]) | Int32(reply[7]) << 8
        guard code == 0, descriptor >= 0 else {
            if descriptor >= 0 { close(descriptor) }
            throw Refusal(description: "the hub refused: \(String(cString: strerror(code == 0 ? EPROTO : code)))")
        }
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFDIR,
              UInt64(status.st_dev) == offer.device, UInt64(status.st_ino) == offer.inode else {
            close(descriptor)
            throw Refusal(description: "the socket sent another directory than the hub's chunk store")
        }
        let path = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(descriptor)"))
            ?? "hub chunk store"
        return ChunkStore(readingFrom: descriptor, directory: path, logger: logger)
    }
}

/// What `RemoteHub` knows of co-located reads on its current connection.
struct LocalStoreState: @unchecked Sendable {
    /// The connection the store was asked for on (weak: a new connection asks again; a lost
    /// or closed one drops the store, `forgetLocalStore`).
    weak var connection: ClientConnection?
    /// The hub's store, or nil: not offered or refused.
    var store: ChunkStore?
    /// Whether objects are no longer written into the store on this connection (a local write
    /// or a hand-over failed in a way that would repeat).
    var writesOff = false
}

extension RemoteHub {
    /// Drops the store asked for on `connection` (nil: any), with its descriptors.
    func forgetLocalStore(_ connection: ClientConnection?) {
        let dropped: ChunkStore? = localStoreState.withLock { state in
            guard connection == nil || state.connection === connection else { return nil }
            let store = state.store
            state = LocalStoreState()
            return store
        }
        _ = dropped      // released here, outside the lock
    }

    /// The co-located hub's store for the current connection, if it has one: asked for by the
    /// connection's first read or write. Calls that need it while it is being asked for wait
    /// for the answer (`localStoreAsking`): until 2026-12-07 they went over TCP meanwhile, so
    /// the second of two chunks uploaded at once right after a mount was sent over TCP.
    func localStore() -> ChunkStore? {
        guard localReads, let connection = currentConnection() else { return nil }
        if let known = knownLocalStore(connection) { return known }
        return localStoreAsking.withLock {
            if let known = knownLocalStore(connection) { return known }
            testWhileAskingForLocalStore?()
            let store = openLocalStore(connection)
            // A connection lost meanwhile keeps nothing (its store goes with this call). A new
            // connection starts with writes into the store on (`writesOff` is per connection).
            guard currentConnection() === connection else { return store }
            localStoreState.withLock { state in
                state = LocalStoreState()
                state.connection = connection
                state.store = store
            }
            return store
        }
    }

    /// The store asked for on `connection` (possibly nil: none), or nil if it was not asked for.
    private func knownLocalStore(_ connection: ClientConnection) -> ChunkStore?? {
        localStoreState.withLock { state in state.connection === connection ? .some(state.store) : .none }
    }

    private func openLocalStore(_ connection: ClientConnection) -> ChunkStore? {
        let offer: LocalReadClient.Offer
        do {
            guard case let .bytes(bytes) = try call(.localReads) else { throw shapeMismatch(.localReads) }
            offer = try LocalReadClient.Offer.decode(bytes)
        } catch let error as WeftError where error.errno == ENOSYS {
            logger.debug("co-located reads: not offered", metadata: ["hub": "\(address)"])
            return nil
        } catch {
            logger.notice("co-located reads off for this connection: the hub did not say where (\(error))",
                          metadata: ["hub": "\(address)"])
            return nil
        }
        do {
            let store = try LocalReadClient.openStore(offer, localEndpoint: LocalReadClient.endpoint(connection.localEndpoint),
                                                      logger: logger)
            logger.notice("co-located reads on: reading objects from \(store.directory)", metadata: ["hub": "\(address)"])
            return store
        } catch {
            logger.notice("co-located reads off for this connection: \(error)", metadata: ["hub": "\(address)"])
            return nil
        }
    }

    /// Reads from the co-located store when there is one (SPEC.md §4, Co-located reads): true
    /// if it did; false to read from the hub. A block that fails its check here is read once
    /// more through `readSlice`, which the hub checks and logs itself.
    func readLocally(_ context: RequestContext, id: SliceID, offset: UInt32,
                     into destination: UnsafeMutableRawBufferPointer) throws -> Bool {
        guard let store = localStore() else { return false }
        do {
            try store.read(id: id, offset: Int(offset), into: destination)
            localReadsServed.add(1, ordering: .relaxed)
            return true
        } catch let error as WeftError where error.errno == EIO {
            localReadsFellBack.add(1, ordering: .relaxed)
            store.forgetOpenObject(id)     // a copy the hub restores is read afresh
            try readSliceChecked(context, id: id, offset: offset, into: destination)
            return true
        } catch {
            localReadsFellBack.add(1, ordering: .relaxed)
            return false
        }
    }

    /// Writes object `id` into the co-located store and has the hub take it over (SPEC.md §4,
    /// Co-located writes): true if it did; false to send it over TCP (no store, a local write
    /// that failed, a hub that does not adopt, or refused the file for a reason TCP avoids).
    /// Any other refusal of the hub is the write's error.
    func writeLocally(_ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws -> Bool {
        guard !unknownOpcodes.withLock({ $0.contains(.adoptObject) }),
              DispatchTime.now().uptimeNanoseconds >= localWritesPausedUntilNs.load(ordering: .relaxed),
              let store = localStore(), let connection = currentConnection(),
              !localStoreState.withLock({ $0.connection === connection && $0.writesOff }) else { return false }
        // Random, so that no other client can guess the name of a file in flight.
        let tag = ChunkStore.adoptedTagBit | UInt32.random(in: 1...(ChunkStore.adoptedTagBit - 1))
        let compression: Compression = compressingSessions.withLock { $0.contains(context.session) } ? .zstd : .none
        testBeforeLocalWrite?(id, tag)
        do {
            try store.writeTemporary(id: id, data: bytes, tag: tag, compression: compression)
        } catch {
            localWritesFellBack.add(1, ordering: .relaxed)
            stopLocalWrites(after: error, on: connection, "writing chunk \(hex(id)) into the hub's store failed")
            return false
        }
        testBeforeAdopt?(id, tag)
        do {
            try adoptObject(context, id: id, tag: tag)
            localWritesServed.add(1, ordering: .relaxed)
            return true
        } catch let error as WeftError where [ENOSYS, EBADMSG, EACCES, EPERM, ENOENT, ENOSPC].contains(error.errno) {
            // ENOENT: a file the hub cannot see (a restarted hub removed it); ENOSPC: the hub's
            // reserve, which it checks before a TCP write stores anything.
            if error.errno == ENOSYS {
                unknownOpcodes.withLock { _ = $0.insert(.adoptObject) }
            } else if error.errno != ENOENT {
                stopLocalWrites(after: error, on: connection, "the hub refused chunk \(hex(id)) written into its store")
            }
            store.removeTemporary(id: id, tag: tag)
            localWritesFellBack.add(1, ordering: .relaxed)
            return false
        } catch {
            // The hub removes the file when it refuses it; this covers a request it never saw.
            store.removeTemporary(id: id, tag: tag)
            throw error
        }
    }

    /// After a failed co-located write: ENOSPC pauses them for `localWritesPauseNs` (objects go
    /// over TCP meanwhile, refused by the hub before anything is written); anything else stops
    /// them on this connection, logged once.
    private func stopLocalWrites(after error: Error, on connection: ClientConnection, _ what: String) {
        if (error as? WeftError)?.errno == ENOSPC {
            localWritesPausedUntilNs.store(DispatchTime.now().uptimeNanoseconds + Self.localWritesPauseNs, ordering: .relaxed)
            logger.debug("\(what): no space; objects go over TCP for a while", metadata: ["hub": "\(address)"])
            return
        }
        let first = localStoreState.withLock { state -> Bool in
            guard state.connection === connection, !state.writesOff else { return false }
            state.writesOff = true
            return true
        }
        if first {
            logger.notice("co-located writes off for this connection: \(what): \(error)", metadata: ["hub": "\(address)"])
        }
    }

    static let localWritesPauseNs: UInt64 = 5_000_000_000
}
