#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import WeftTestSupport
import XCTest
import WeftChunks
import WeftProto
@testable import WeftNet

/// HubServer and RemoteHub over real loopback sockets, against `FakeHub`.
final class LoopbackTests: XCTestCase {
    private var logger: Logger {
        var logger = Logger(label: "weft.net.test")
        logger.logLevel = ProcessInfo.processInfo.environment["WEFT_TEST_LOG"] != nil ? .trace : .critical
        return logger
    }

    private func startServer(_ hub: FakeHub, port: Int = 0, maxInFlight: Int = 512) throws -> (HubServer, Int) {
        let server = HubServer(hub: hub, logger: logger, workerThreads: 8, eventLoopThreads: 1,
                               maxInFlightRequestsPerConnection: maxInFlight)
        let bound = try server.listen(host: "127.0.0.1", port: port)
        return (server, bound)
    }

    private func context(_ session: SessionID) -> RequestContext {
        RequestContext(session: session, credentials: Credentials(uid: 1000, gid: 1000, groups: [10]))
    }

    /// A TCP socket listening on a free loopback port, that nothing accepts from unless the test does.
    private func listeningSocket() throws -> (Int32, Int) {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        do {
            try withUnsafeMutablePointer(to: &address) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    guard bind(listener, $0, length) == 0, Glibc.listen(listener, 4) == 0,
                          getsockname(listener, $0, &length) == 0 else { throw WeftError(errno, "listen") }
                }
            }
        } catch {
            Glibc.close(listener)
            throw error
        }
        return (listener, Int(UInt16(bigEndian: address.sin_port)))
    }

    /// A hub played by a script on a plain socket: it accepts one connection and hands each
    /// request read from it to `respond`, with a function that writes bytes back, until the
    /// client closes. The listener closes when the test ends.
    private func startScriptedHub(_ respond: @escaping (Frame, HubRequest, (ArraySlice<UInt8>) -> Void) -> Void) throws -> Int {
        let (listener, port) = try listeningSocket()
        addTeardownBlock { Glibc.close(listener) }
        let script = Thread {
            let connection = accept(listener, nil, nil)
            guard connection >= 0 else { return }
            defer { Glibc.close(connection) }
            func receiveFrame() -> [UInt8]? {
                guard let prefix = receiveFully(connection, 4) else { return nil }
                let length = Int(prefix.reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
                return receiveFully(connection, length).map { prefix + $0 }
            }
            func send(_ bytes: ArraySlice<UInt8>) {
                var sent = 0
                while sent < bytes.count {
                    let n = bytes.withUnsafeBytes { Glibc.send(connection, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
                    if n <= 0 { return }
                    sent += n
                }
            }
            while let bytes = receiveFrame(), let frame = try? WireCodec.decodeFrame(bytes),
                  let request = try? WireCodec.decodeRequest(frame) {
                respond(frame, request, send)
            }
        }
        script.start()
        return port
    }

    func testEveryMethodOverTCP() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        try exerciseEveryMethod(client, hub)
    }

    /// A client with a session on a hub `configure` makes older than some opcodes; the server
    /// and the client stop when the test ends.
    private func clientOfAnOldHub(_ configure: (FakeHub) -> Void) throws -> (FakeHub, RemoteHub, RequestContext) {
        let hub = FakeHub()
        configure(hub)
        let (server, port) = try startServer(hub)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        addTeardownBlock {
            client.close()
            server.shutdown()
        }
        return (hub, client, context(try client.openSession(agentName: "new-agent").0))
    }

    /// fsck asks with opcode 55 and gets the problems that remain; a hub older than it
    /// answers ENOSYS and gets opcode 30, whose report says nothing of them (nil), once.
    func testFsckFallsBackToOpcode30OnAHubThatPredatesOpcode55() throws {
        final class Asked: @unchecked Sendable {
            let lock = NSLock()
            var opcodes: [HubOpcode] = []
        }
        let asked = Asked()
        let port = try startScriptedHub { frame, request, send in
            asked.lock.withLock { asked.opcodes.append(frame.opcode) }
            let report = FsckReport(inodesChecked: 4, chunksChecked: 2, problems: ["chunk 9 could not be checked"],
                                    repaired: [], remaining: ["chunk 9 could not be checked"])
            let result: Result<HubResponse, WeftError>
            switch request {
            case .fsck: result = .success(.fsckReport(report))
            default: result = .failure(WeftError(ENOSYS, "opcode \(frame.opcode.rawValue) is unknown to this hub"))
            }
            send(WireCodec.encodeResponse(id: frame.requestID, opcode: frame.opcode, result)[...])
        }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        for _ in 0..<2 {
            let report = try client.fsck(repair: true)
            XCTAssertEqual(report.problems, ["chunk 9 could not be checked"])
            XCTAssertNil(report.remaining, "opcode 30's reply does not say what remains")
            XCTAssertEqual(report.unresolved, report.problems, "so every problem counts as remaining")
        }
        XCTAssertEqual(asked.lock.withLock { asked.opcodes }.filter { $0 == .fsck || $0 == .fsckRemaining },
                       [.fsckRemaining, .fsck, .fsck], "ENOSYS is remembered: no second try of 55")
    }

    func testSyncFileFallsBackToSyncOnAHubThatPredatesIt() throws {
        let (hub, client, c) = try clientOfAnOldHub { $0.predatesSyncFile = true }
        try client.syncFile(c, ino: 3)
        try client.syncFile(c, ino: 4)   // ENOSYS is remembered: no second try
        let (syncs, files, seen) = hub.snapshot { ($0.syncs, $0.syncedFiles, $0.seenSessions.count) }
        XCTAssertEqual(syncs, 2)
        XCTAssertEqual(files, [])
        XCTAssertEqual(seen, 1 + 2, "one syncFile refused, then two syncs")
    }

    /// SPEC.md §4, Compressed uploads: in a session on a zstd volume an object that shrinks goes
    /// as its stored image (opcode 54), one that does not as raw bytes; a refused image is sent
    /// again raw, and after it, as for a hub that predates opcode 54, raw bytes from then on.
    func testUploadsToAZstdVolumeGoCompressedAndFallBackToRawBytes() throws {
        let compressible = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 / 9) }
        var random = SeededRandom(seed: 54)
        let incompressible = random.bytes(1 << 20)
        func write(_ client: RemoteHub, _ c: RequestContext, _ id: SliceID, _ data: [UInt8]) throws {
            try data.withUnsafeBytes { try client.writeSlice(c, id: id, bytes: $0) }
        }

        let (hub, client, c) = try clientOfAnOldHub { $0.volume.compression = .zstd }
        try write(client, c, 1, compressible)
        try write(client, c, 2, incompressible)
        var (images, slices, calls) = hub.snapshot { ($0.objectImages, $0.slices, $0.writeObjectCalls) }
        XCTAssertEqual(calls, 1, "only the object that shrinks goes as an image")
        let image = try XCTUnwrap(images[1])
        XCTAssertNil(slices[1])
        XCTAssertLessThan(image.count, compressible.count / 4)
        XCTAssertEqual(slices[2], incompressible, "nothing shrank: raw bytes")
        XCTAssertEqual(client.compressedUploads.objects, 1)
        XCTAssertEqual(client.compressedUploads.rawBytes, compressible.count)
        XCTAssertEqual(client.compressedUploads.imageBytes, image.count)
        // The image is what a store writes: a real one takes it after its checks and reads the bytes back.
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("weft-image-\(getpid())-\(UInt64.random(in: 0...UInt64.max))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try ChunkStore(directory: directory, compression: .zstd, logger: logger)
        try image.withUnsafeBytes { try store.writeImage(id: 1, image: $0) }
        XCTAssertEqual(try store.read(id: 1, offset: 0, length: compressible.count), compressible)

        hub.snapshot { $0.writeObjectErrno = EBADMSG }
        try write(client, c, 3, compressible)
        try write(client, c, 4, compressible)
        (images, slices, calls) = hub.snapshot { ($0.objectImages, $0.slices, $0.writeObjectCalls) }
        XCTAssertEqual(calls, 2, "after a refused image, raw bytes until the next connection")
        XCTAssertEqual(slices[3], compressible, "refused, then sent raw under the same id")
        XCTAssertEqual(slices[4], compressible)
        XCTAssertNil(images[3])

        let (old, oldClient, oc) = try clientOfAnOldHub { $0.volume.compression = .zstd; $0.writeObjectErrno = ENOSYS }
        try write(oldClient, oc, 5, compressible)
        try write(oldClient, oc, 6, compressible)
        let oldState = old.snapshot { ($0.slices, $0.writeObjectCalls) }
        XCTAssertEqual(oldState.1, 1, "ENOSYS is remembered")
        XCTAssertEqual(oldState.0[5], compressible)
        XCTAssertEqual(oldState.0[6], compressible)
        XCTAssertEqual(oldClient.compressedUploads.objects, 0)

        let (plain, plainClient, pc) = try clientOfAnOldHub { _ in }
        try write(plainClient, pc, 7, compressible)
        XCTAssertEqual(plain.snapshot { ($0.slices[7], $0.writeObjectCalls) }.1, 0, "an uncompressed volume gets raw bytes")
        XCTAssertEqual(plain.snapshot { $0.slices[7] }, compressible)

        let off = FakeHub()
        off.volume.compression = .zstd
        let (server, port) = try startServer(off)
        let offClient = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), compressUploads: false, logger: logger)
        defer { offClient.close(); server.shutdown() }
        try write(offClient, context(try offClient.openSession(agentName: "off").0), 8, compressible)
        XCTAssertEqual(off.snapshot { $0.writeObjectCalls }, 0, "compressUploads false")
        XCTAssertEqual(off.snapshot { $0.slices[8] }, compressible)
    }

    func testOpenLayoutFallsBackToOpenOnAHubThatPredatesIt() throws {
        let (hub, client, c) = try clientOfAnOldHub { $0.predatesOpenLayout = true }
        let first = try client.openLayout(c, ino: 3, flags: O_RDONLY, chunkCount: 8, dataMaxBytes: 65536)
        XCTAssertEqual(first.attributes.ino, 3)
        XCTAssertTrue(first.chunks.isEmpty && first.data.isEmpty, "an open without lists: the first read fetches them")
        _ = try client.openLayout(c, ino: 4, flags: O_RDONLY, chunkCount: 8, dataMaxBytes: 65536)   // ENOSYS is remembered
        let (opened, withLayout, seen) = hub.snapshot { ($0.opened, $0.openedWithLayout, $0.seenSessions.count) }
        XCTAssertEqual(opened, [3, 4])
        XCTAssertEqual(withLayout, [])
        XCTAssertEqual(seen, 1 + 2, "one openLayout refused, then two opens")

        let (current, currentClient, c2) = try clientOfAnOldHub { _ in }
        let answer = try currentClient.openLayout(c2, ino: 5, flags: O_RDONLY, chunkCount: 3, dataMaxBytes: 7)
        XCTAssertEqual(answer.attributes.ino, 5)
        XCTAssertEqual(answer.chunks.map { $0.map(\.id) }, [[1], [2], [3]])
        XCTAssertEqual(answer.data, [UInt8](repeating: 5, count: 7))
        XCTAssertEqual(current.snapshot { ($0.opened, $0.openedWithLayout) }.1, [5])
        XCTAssertEqual(current.snapshot { ($0.opened, $0.openedWithLayout) }.0, [])
    }

    /// After a reconnection (a rolling upgrade of the hub) the client asks for a method the old
    /// hub refused again: before, it used the fallback until the mount ended.
    func testAMethodAnOldHubRefusedIsAskedAgainAfterAReconnection() throws {
        let old = FakeHub()
        old.predatesSyncFile = true
        let (first, port) = try startServer(old)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 2000, logger: logger)
        defer { client.close() }
        let c = context(0)
        try client.syncFile(c, ino: 3)
        try client.syncFile(c, ino: 4)
        XCTAssertEqual(old.snapshot { ($0.syncs, $0.syncedFiles) }.0, 2, "the old hub: sync each time")
        first.shutdown()
        let upgraded = FakeHub()
        let (second, _) = try startServer(upgraded, port: port)
        defer { second.shutdown() }
        XCTAssertTrue(eventually(timeoutSeconds: 10) { (try? client.getattr(c, ino: 7)) != nil })
        try client.syncFile(c, ino: 5)
        let (syncs, files) = upgraded.snapshot { ($0.syncs, $0.syncedFiles) }
        XCTAssertEqual(files, [5], "asked again on the new connection")
        XCTAssertEqual(syncs, 0)
    }

    func testReleaseManyFallsBackToOneReleaseEachOnAHubThatPredatesIt() throws {
        let (hub, client, c) = try clientOfAnOldHub { $0.predatesReleaseMany = true }
        try client.releaseMany(c, inos: [3, 3, 4])
        try client.releaseMany(c, inos: [5])   // ENOSYS is remembered: no second try
        let (released, calls, seen) = hub.snapshot { ($0.released, $0.releaseManyCalls, $0.seenSessions.count) }
        XCTAssertEqual(released, [3, 3, 4, 5])
        XCTAssertEqual(calls, 0)
        XCTAssertEqual(seen, 1 + 3 + 1, "one releaseMany refused, then four releases")
    }

    func testEveryMethodOverUnixSocket() throws {
        let path = NSTemporaryDirectory() + "weft-net-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let hub = FakeHub()
        let server = HubServer(hub: hub, logger: logger, workerThreads: 4, eventLoopThreads: 1)
        try server.listen(unixSocketPath: path)
        let client = RemoteHub(address: try HubAddress.parse("unix:" + path), logger: logger)
        try exerciseEveryMethod(client, hub)
        client.close()
        server.shutdown()
        XCTAssertFalse(FileManager.default.fileExists(atPath: path), "shutdown removes the socket file")
    }

    /// Every HubAPI method once, checking that results and errors arrive intact.
    private func exerciseEveryMethod(_ client: RemoteHub, _ hub: FakeHub) throws {
        let (session, volume) = try client.openSession(agentName: "agent-one")
        XCTAssertEqual(volume, FakeHub.volume)
        let c = context(session)
        XCTAssertEqual(try client.lookup(c, parent: 1, name: Array("a".utf8)), FakeHub.attributes(ino: 2, session: session))
        XCTAssertEqual(try client.getattr(c, ino: 9).ino, 9)
        XCTAssertEqual(try client.setattr(c, ino: 9, SetAttributes(mode: 0o600, size: 77)).size, 77)
        XCTAssertEqual(try client.create(c, parent: 1, name: [1], mode: 0o666, rdev: 3, umask: 0o022, exclusive: false).mode, 0o644)
        XCTAssertThrowsError(try client.create(c, parent: 1, name: Array("exists".utf8), mode: 0, rdev: 0, umask: 0, exclusive: true)) {
            XCTAssertEqual(($0 as? WeftError)?.errno, EEXIST)
        }
        XCTAssertEqual(try client.mkdir(c, parent: 1, name: [2], mode: 0o777, umask: 0o002).mode, UInt32(S_IFDIR) | 0o775)
        try client.unlink(c, parent: 1, name: [3])
        XCTAssertThrowsError(try client.rmdir(c, parent: 1, name: [4])) { XCTAssertEqual(($0 as? WeftError)?.errno, ENOTEMPTY) }
        XCTAssertEqual(try client.symlink(c, parent: 1, name: [5], target: [1, 2, 3]).size, 3)
        XCTAssertEqual(try client.readlink(c, ino: 12), Array("../target/of/12".utf8))
        XCTAssertEqual(try client.link(c, ino: 13, newParent: 1, newName: [6]).nlink, 2)
        try client.rename(c, parent: 1, name: [7], newParent: 1, newName: [8], flags: .noReplace)
        XCTAssertThrowsError(try client.rename(c, parent: 1, name: [7], newParent: 2, newName: [8], flags: .exchange)) {
            XCTAssertEqual(($0 as? WeftError)?.errno, EXDEV)
        }
        let page = try client.readdir(c, ino: 1, after: nil, limit: 10)
        XCTAssertEqual(page.map(\.name), (0..<10).map { Array("entry\($0)".utf8) })
        XCTAssertEqual(try client.readdir(c, ino: 1, after: Array("entry9".utf8), limit: 2).map(\.ino), [5010, 5011])
        XCTAssertThrowsError(try client.readdir(c, ino: 1, after: nil, limit: -1)) { XCTAssertEqual(($0 as? WeftError)?.errno, EINVAL) }
        try client.access(c, ino: 1, mask: 4)
        XCTAssertThrowsError(try client.access(c, ino: 1, mask: 2)) { XCTAssertEqual(($0 as? WeftError)?.errno, EACCES) }
        XCTAssertEqual(try client.open(c, ino: 14, flags: O_RDWR).ino, 14)
        try client.release(c, ino: 14)
        try client.releaseMany(c, inos: [15, 15, 16])
        XCTAssertEqual(hub.snapshot { ($0.released, $0.releaseManyCalls) }.0, [14, 15, 15, 16])
        XCTAssertEqual(try client.getxattr(c, ino: 1, name: [9]), [9, 0, 1, 2])
        XCTAssertThrowsError(try client.getxattr(c, ino: 1, name: Array("user.none".utf8))) {
            XCTAssertEqual(($0 as? WeftError)?.errno, ENODATA)
        }
        try client.setxattr(c, ino: 1, name: [1], value: [2], flags: .create)
        XCTAssertEqual(try client.listxattr(c, ino: 1), [Array("user.a".utf8), Array("user.bb".utf8), []])
        try client.removexattr(c, ino: 1, name: [1])
        XCTAssertEqual(try client.statfs(c).freeInodes, 12345)
        XCTAssertEqual(try client.allocateSliceIDs(c, count: 5), 1 << 33 + 5)
        let data = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 >> 3) }
        try client.writeSlice(c, id: 77, data: data)
        XCTAssertEqual(try client.readSlice(c, id: 77, offset: 0, length: UInt32(data.count)), data)
        XCTAssertEqual(try client.readSlice(c, id: 77, offset: 100, length: 50), Array(data[100..<150]))
        XCTAssertThrowsError(try client.readSlice(c, id: 78, offset: 0, length: 1)) {
            XCTAssertEqual(($0 as? WeftError)?.errno, EIO)
            XCTAssertEqual(($0 as? WeftError)?.message, "slice 78 damaged")
        }
        // The bulk paths: from and into caller memory.
        try data.withUnsafeBytes { try client.writeSlice(c, id: 79, bytes: UnsafeRawBufferPointer(rebasing: $0[8..<(1 << 20)])) }
        var into = [UInt8](repeating: 0, count: 50)
        try into.withUnsafeMutableBytes { try client.readSlice(c, id: 79, offset: 100, into: $0) }
        XCTAssertEqual(into, Array(data[108..<158]))
        try into.withUnsafeMutableBytes { try client.readSlice(c, id: 77, offset: 10, holders: [3], into: $0) }
        XCTAssertEqual(into, Array(data[10..<60]))
        XCTAssertThrowsError(try into.withUnsafeMutableBytes { try client.readSlice(c, id: 78, offset: 0, into: $0) }) {
            XCTAssertEqual(($0 as? WeftError)?.errno, EIO)
            XCTAssertEqual(($0 as? WeftError)?.message, "slice 78 damaged")
        }
        let (attributes, chunks) = try client.layout(c, ino: 20, firstChunk: 4, count: 5)
        XCTAssertEqual(attributes.ino, 20)
        XCTAssertEqual(chunks.map(\.count), [1, 2, 0, 1, 2])
        let commit = SliceCommit(chunkIndex: 1, slice: Slice(id: 77, offsetInChunk: 0, length: 10, objectLength: 10))
        XCTAssertEqual(try client.commitSlices(c, ino: 20, slices: [commit, commit], minimumSize: 999, durable: true).dataVersion, 2)
        try client.sync(c)
        try client.syncFile(c, ino: 77)
        XCTAssertEqual(hub.snapshot { ($0.syncs, $0.syncedFiles) }.1, [77])
        XCTAssertEqual(try client.status().agents, ["agent-one"])
        XCTAssertEqual(try client.fsck(repair: true).repaired, ["removed chunk 5"])
        XCTAssertEqual(try client.fsck(repair: true).remaining, [], "opcode 55 says nothing remains")
        XCTAssertEqual(try client.fsck(repair: false).remaining, ["orphan chunk 5"])
        try client.closeSession(session)
        XCTAssertEqual(hub.snapshot { $0.closedSessions }, [session])
    }

    func testErrnoAndMessagePropagate() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "errno")
        XCTAssertThrowsError(try client.lookup(context(session), parent: 1, name: Array("missing".utf8))) {
            let error = $0 as? WeftError
            XCTAssertEqual(error?.errno, ENOENT)
            XCTAssertEqual(error?.message, "no entry 'missing' in 1")
        }
        XCTAssertThrowsError(try client.closeSession(12345)) { XCTAssertEqual(($0 as? WeftError)?.errno, ENOENT) }
    }

    func testPipelinedRequestsCompleteOutOfOrder() throws {
        let hub = FakeHub()
        // Some inodes take a few ms, so that answers to the many threads below interleave.
        hub.getattrDelayMs = { $0 % 3 == 0 ? 5 : 0 }
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        defer { hub.releaseBlocked() }
        let (session, _) = try client.openSession(agentName: "pipeline")
        let sessionContext = context(session)

        // Four requests go first on the connection and wait in the hub until released.
        let blockedAnswered = Locked(0)
        let blocked = DispatchGroup()
        for _ in 0..<4 {
            DispatchQueue.global().async(group: blocked) {
                if (try? client.lookup(sessionContext, parent: 1, name: Array("block".utf8))) != nil {
                    blockedAnswered.mutate { $0 += 1 }
                }
            }
        }
        XCTAssertTrue(hub.waitForBlocked(4), "the four blocking requests reached the hub")

        // Every later request on the same connection gets its own answer while those four still wait.
        let threads = 48
        let failures = Locked<[String]>([])
        runOnThreads(threads) { index in
            let ino = InodeID(index + 2)
            for round in 0..<3 {
                do {
                    let attributes = try client.getattr(sessionContext, ino: ino)
                    if attributes.ino != ino || attributes.uid != UInt32(session) {
                        failures.mutate { $0.append("thread \(index) round \(round): asked \(ino), got \(attributes.ino)") }
                    }
                } catch {
                    failures.mutate { $0.append("thread \(index): \(error)") }
                }
            }
        }
        XCTAssertEqual(failures.value, [])
        XCTAssertEqual(blockedAnswered.value, 0, "answers came back out of order: the first four are still unanswered")
        XCTAssertGreaterThan(hub.snapshot { $0.maxRunning }, 4, "requests ran concurrently on the worker pool")

        hub.releaseBlocked()
        XCTAssertEqual(blocked.wait(timeout: .now() + 5), .success)
        XCTAssertEqual(blockedAnswered.value, 4)
    }

    func testSlowRequestDoesNotHoldBackFastOne() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "order")
        let slowDone = expectation(description: "slow")
        let slowFinished = Locked(Date.distantFuture)
        let slowContext = context(session)
        DispatchQueue.global().async {
            _ = try? client.lookup(slowContext, parent: 1, name: Array("slow-400".utf8))
            slowFinished.value = Date()
            slowDone.fulfill()
        }
        usleep(50_000)
        _ = try client.lookup(context(session), parent: 1, name: Array("fast".utf8))
        let fastFinished = Date()
        wait(for: [slowDone], timeout: 5)
        XCTAssertLessThan(fastFinished, slowFinished.value)
    }

    func testBulkReadThatTimesOutNeverWritesLater() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), requestTimeoutMs: 200, logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "late")
        try client.writeSlice(context(session), id: FakeHub.slowSliceID, data: [UInt8](repeating: 0xAB, count: 1 << 20))
        var destination = [UInt8](repeating: 0, count: 1 << 20)
        XCTAssertThrowsError(try destination.withUnsafeMutableBytes {
            try client.readSlice(context(session), id: FakeHub.slowSliceID, offset: 0, into: $0)
        }) { XCTAssertEqual(($0 as? WeftError)?.errno, ETIMEDOUT) }
        // The caller owns its memory again at once: the answer that comes later is dropped.
        _ = destination.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0x11) }
        usleep(800_000)
        XCTAssertTrue(destination.allSatisfy { $0 == 0x11 }, "a late response must not write into the caller's memory")
        try client.writeSlice(context(session), id: 81, data: [1, 2, 3, 4])
        var after = [UInt8](repeating: 0, count: 4)
        try after.withUnsafeMutableBytes { try client.readSlice(context(session), id: 81, offset: 0, into: $0) }
        XCTAssertEqual(after, [1, 2, 3, 4], "the connection still serves bulk reads")
    }

    /// SPEC.md §4, Agent reading thread: the reading thread receives a large reply straight into
    /// its caller's memory; a caller that times out while the reply is half in owns its memory
    /// again at once (the rest is read and dropped), and the stream stays in step.
    func testABulkReplyCutOffByATimeoutNeverWritesLaterAndTheStreamStaysInStep() throws {
        let pattern = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        // A scripted hub: a session; no readBlocks (ENOSYS); the 1 MiB reply of slice 1 in two
        // parts 800 ms apart; slice 2 whole.
        let port = try startScriptedHub { frame, request, send in
            switch request {
            case .openSession:
                send(WireCodec.encodeResponse(id: frame.requestID, opcode: frame.opcode, .success(.session(100, FakeHub.volume)))[...])
            case .readBlocks:
                send(WireCodec.encodeResponse(id: frame.requestID, opcode: frame.opcode,
                                              .failure(WeftError(ENOSYS, "opcode 49 is unknown to this hub")))[...])
            case .readSlice(_, let id, _, _) where id == 1:
                let reply = WireCodec.encodeResponse(id: frame.requestID, opcode: frame.opcode, .success(.bytes(pattern)))
                send(reply[..<(300 << 10)])
                usleep(800_000)
                send(reply[(300 << 10)...])
            case .readSlice:
                send(WireCodec.encodeResponse(id: frame.requestID, opcode: frame.opcode, .success(.bytes([1, 2, 3, 4])))[...])
            default:
                send(WireCodec.encodeResponse(id: frame.requestID, opcode: frame.opcode, .failure(WeftError(ENOSYS, "no")))[...])
            }
        }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), requestTimeoutMs: 300, logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "cut-off")
        var destination = [UInt8](repeating: 0, count: 1 << 20)
        XCTAssertThrowsError(try destination.withUnsafeMutableBytes {
            try client.readSlice(context(session), id: 1, offset: 0, into: $0)
        }) { XCTAssertEqual(($0 as? WeftError)?.errno, ETIMEDOUT) }
        _ = destination.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0x11) }
        usleep(1_200_000)
        XCTAssertTrue(destination.allSatisfy { $0 == 0x11 }, "the rest of the reply must not reach the caller's memory")
        var after = [UInt8](repeating: 0, count: 4)
        try after.withUnsafeMutableBytes { try client.readSlice(context(session), id: 2, offset: 0, into: $0) }
        XCTAssertEqual(after, [1, 2, 3, 4], "the stream is still in step")
        XCTAssertEqual(client.directReceiveCount, 0, "the cut-off reply completed nothing")

    }

    func testRequestTimeout() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        defer { hub.releaseBlocked() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), requestTimeoutMs: 300, logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "timeout")
        let start = Date()
        XCTAssertThrowsError(try client.lookup(context(session), parent: 1, name: Array("block".utf8))) {
            XCTAssertEqual(($0 as? WeftError)?.errno, ETIMEDOUT)
        }
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertGreaterThanOrEqual(elapsed, 0.29)
        XCTAssertLessThan(elapsed, 2.0)
        // The connection still serves; the late answer is dropped.
        hub.releaseBlocked()
        XCTAssertEqual(try client.getattr(context(session), ino: 5).ino, 5)
    }

    func testServerDownGivesEIOQuickly() throws {
        let port = try freePort()
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 1000, logger: logger)
        defer { client.close() }
        for _ in 0..<3 {
            let start = Date()
            XCTAssertThrowsError(try client.getattr(context(1), ino: 1)) {
                let error = $0 as? WeftError
                XCTAssertEqual(error?.errno, EIO)
                XCTAssertTrue(error?.message.hasPrefix("hub 127.0.0.1:\(port) does not answer") ?? false, "\($0)")
            }
            XCTAssertLessThan(Date().timeIntervalSince(start), 1.5)
        }
        // Unix socket that does not exist.
        let unixClient = RemoteHub(address: .unix(path: "/nonexistent/weft.sock"), connectTimeoutMs: 1000, logger: logger)
        defer { unixClient.close() }
        XCTAssertThrowsError(try unixClient.status()) { XCTAssertEqual(($0 as? WeftError)?.errno, EIO) }
    }

    /// Open descriptors of this process.
    private func openDescriptors() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
    }

    func testCloseDuringAConnectWaitsForItAndLeavesNothingOpen() throws {
        // A hub that accepts and never answers: the connect waits for the answer to its fence.
        // A close meanwhile must not stop the event loop under the connection being made (its
        // channel could then never close, and its reading thread and descriptors stayed).
        let (listener, port) = try listeningSocket()
        defer { Glibc.close(listener) }
        let before = openDescriptors()
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 500,
                               requestTimeoutMs: 1500, logger: logger)
        let failed = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = try? client.statfs(self.context(1))
            failed.signal()
        }
        usleep(300_000)   // connected, waiting for the fence's answer
        let start = Date()
        client.close()
        XCTAssertLessThan(Date().timeIntervalSince(start), 5, "close waited past the connect's own bound")
        XCTAssertEqual(failed.wait(timeout: .now() + 5), .success)
        XCTAssertTrue(waitUntil { self.openDescriptors() <= before },
                      "descriptors left open after close: \(openDescriptors()) against \(before) before")
    }

    func testHubThatAcceptsButNeverAnswersTimesOut() throws {
        // A listening socket nobody accepts from: the kernel completes the handshake, then silence.
        let (listener, port) = try listeningSocket()
        defer { Glibc.close(listener) }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 500,
                               requestTimeoutMs: 400, logger: logger)
        defer { client.close() }
        let start = Date()
        XCTAssertThrowsError(try client.statfs(context(1))) { XCTAssertEqual(($0 as? WeftError)?.errno, ETIMEDOUT) }
        XCTAssertLessThan(Date().timeIntervalSince(start), 2.0)
    }

    func testReconnectAfterServerRestartSubstitutesSession() throws {
        let firstHub = FakeHub(firstSession: 100)
        let (firstServer, port) = try startServer(firstHub)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 2000, logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "survivor")
        XCTAssertEqual(session, 100)
        XCTAssertEqual(try client.getattr(context(session), ino: 3).uid, 100)

        firstServer.shutdown()
        XCTAssertEqual(firstHub.snapshot { $0.closedSessions }, [100], "the hub closed the departed agent's session")
        XCTAssertThrowsError(try client.getattr(context(session), ino: 3)) { XCTAssertEqual(($0 as? WeftError)?.errno, EIO) }

        let secondHub = FakeHub(firstSession: 500)
        let (secondServer, _) = try startServer(secondHub, port: port)
        defer { secondServer.shutdown() }
        // The caller keeps its id; the hub sees the new session.
        XCTAssertEqual(try client.getattr(context(session), ino: 3).uid, 500)
        XCTAssertEqual(secondHub.snapshot { $0.openedSessions }, [500: "survivor"])
        XCTAssertEqual(secondHub.snapshot { $0.seenSessions }, [500])
        // A second session opened now must not collide with the caller's first id.
        let (second, _) = try client.openSession(agentName: "second")
        XCTAssertNotEqual(second, session)
        XCTAssertEqual(try client.getattr(context(second), ino: 3).uid, 501)
        try client.closeSession(session)
        XCTAssertEqual(secondHub.snapshot { $0.closedSessions }, [500])
    }

    func testSessionClosedWhileDisconnectedIsNotReopened() throws {
        let firstHub = FakeHub(firstSession: 10)
        let (firstServer, port) = try startServer(firstHub)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        let (kept, _) = try client.openSession(agentName: "kept")
        let (dropped, _) = try client.openSession(agentName: "dropped")
        firstServer.shutdown()
        XCTAssertEqual(firstHub.snapshot { $0.closedSessions }.sorted(), [kept, dropped])
        XCTAssertNoThrow(try client.closeSession(dropped), "nothing to close on a hub that is gone")

        let secondHub = FakeHub(firstSession: 20)
        let (secondServer, _) = try startServer(secondHub, port: port)
        defer { secondServer.shutdown() }
        XCTAssertTrue(waitUntil { (try? client.getattr(self.context(kept), ino: 1)) != nil })
        XCTAssertEqual(secondHub.snapshot { $0.openedSessions }, [20: "kept"])
    }

    func testConnectionCloseClosesItsSessions() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        let (first, _) = try client.openSession(agentName: "one")
        let (second, _) = try client.openSession(agentName: "two")
        try client.closeSession(first)
        let other = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { other.close() }
        let (bystander, _) = try other.openSession(agentName: "bystander")

        client.close()
        XCTAssertTrue(waitUntil { hub.snapshot { $0.closedSessions.contains(second) } })
        XCTAssertEqual(hub.snapshot { $0.closedSessions }.sorted(), [first, second])
        XCTAssertEqual(hub.snapshot { Set($0.openedSessions.keys) }, [bystander])
        XCTAssertThrowsError(try client.status()) { XCTAssertEqual(($0 as? WeftError)?.errno, ESHUTDOWN) }
    }

    func testInFlightBoundAppliesBackpressure() throws {
        let hub = FakeHub()
        hub.blockAll = true
        let (server, port) = try startServer(hub, maxInFlight: 4)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        let answered = Locked(0)
        let anyContext = context(0)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            self.runOnThreads(20) { index in
                if (try? client.getattr(anyContext, ino: InodeID(index))) != nil {
                    answered.mutate { $0 += 1 }
                }
            }
            done.signal()
        }
        XCTAssertTrue(hub.waitForBlocked(4))
        usleep(200_000)
        XCTAssertEqual(hub.snapshot { $0.blockedCount }, 4, "no more than the bound run at once")
        hub.releaseBlocked()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(answered.value, 20)
        XCTAssertEqual(hub.snapshot { $0.maxRunning }, 4)
    }

    func testMalformedFrameClosesOnlyThatConnection() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "innocent")

        let oversized = withUnsafeBytes(of: UInt32(WireCodec.maxFrameBytes + 1).littleEndian, Array.init)
        var badVersion = WireCodec.encodeRequest(id: 1, .status)
        badVersion[4] = 9
        var badPayload = WireCodec.encodeRequest(id: 1, .getattr(context(1), ino: 1))
        badPayload += [0xEE]
        badPayload.replaceSubrange(0..<4, with: withUnsafeBytes(of: UInt32(badPayload.count - 4).littleEndian, Array.init))
        let responseToHub = WireCodec.encodeResponse(id: 1, opcode: .sync, .success(.empty))
        for garbage in [oversized, badVersion, badPayload, responseToHub] {
            let socket = try RawSocket(port: port)
            try socket.send(garbage)
            XCTAssertTrue(socket.readsEndOfStream(), "the server closed the connection")
            XCTAssertEqual(try client.getattr(context(session), ino: 4).ino, 4, "others are still served")
        }
        XCTAssertTrue(waitUntil { server.connectionCount == 1 })
    }

    func testUnknownOpcodeIsAnsweredWithENOSYS() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        var frame = WireCodec.encodeRequest(id: 0xABCDEF, .status)
        frame[6] = 0xF0
        frame[7] = 0x7F
        let socket = try RawSocket(port: port)
        try socket.send(frame + WireCodec.encodeRequest(id: 2, .status))
        // Two answers, in either order: the connection stays usable after the unknown opcode.
        var answers: [UInt64: [UInt8]] = [:]
        for _ in 0..<2 {
            let prefix = try socket.receive(count: 4)
            let answer = prefix + (try socket.receive(count: Int(prefix.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })))
            answers[answer.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self) }] = answer
        }
        let unknown = try XCTUnwrap(answers[0xABCDEF])
        XCTAssertEqual(Array(unknown[4..<8]), [WireCodec.version, 1, 0xF0, 0x7F], "version, kind response, opcode echoed")
        XCTAssertEqual(Array(unknown[16..<20]), withUnsafeBytes(of: ENOSYS.littleEndian, Array.init))
        let status = try WireCodec.decodeResponse(WireCodec.decodeFrame(try XCTUnwrap(answers[2]))).get()
        guard case .status = status else { return XCTFail("expected a status, got \(status)") }
    }

    func testConnectionBeyondTheBoundIsRefused() throws {
        let hub = FakeHub()
        let server = HubServer(hub: hub, logger: logger, workerThreads: 2, eventLoopThreads: 1, maxConnections: 1)
        let port = try server.listen(host: "127.0.0.1", port: 0)
        defer { server.shutdown() }
        let first = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { first.close() }
        XCTAssertNoThrow(try first.status())
        let second = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), requestTimeoutMs: 2000, logger: logger)
        defer { second.close() }
        XCTAssertThrowsError(try second.status()) { XCTAssertEqual(($0 as? WeftError)?.errno, EIO) }
        XCTAssertNoThrow(try first.status(), "the admitted connection is unaffected")
    }

    func testListenOnBusyPortFails() throws {
        let (server, port) = try startServer(FakeHub())
        defer { server.shutdown() }
        let other = HubServer(hub: FakeHub(), logger: logger, workerThreads: 1, eventLoopThreads: 1)
        defer { other.shutdown() }
        XCTAssertThrowsError(try other.listen(host: "127.0.0.1", port: port)) {
            XCTAssertEqual(($0 as? WeftError)?.errno, EADDRINUSE, "\($0)")
        }
    }

    func testRequestsAfterCloseFail() throws {
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: 1), logger: logger)
        client.close()
        client.close()
        XCTAssertThrowsError(try client.status()) { XCTAssertEqual(($0 as? WeftError)?.errno, ESHUTDOWN) }
    }

    // MARK: Helpers

    /// Runs `body(0..<count)` on `count` threads of their own (blocking calls need real threads,
    /// not a pool sized to the cores) and returns when all have finished.
    private func runOnThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
        let finished = DispatchSemaphore(value: 0)
        for index in 0..<count {
            let thread = Thread {
                body(index)
                finished.signal()
            }
            thread.stackSize = 1 << 20
            thread.start()
        }
        for _ in 0..<count { finished.wait() }
    }

    private func waitUntil(timeoutSeconds: Double = 5, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            if condition() { return true }
            usleep(10_000)
        }
        return condition()
    }

    /// A TCP port nothing listens on (bound, read, released).
    private func freePort() throws -> Int {
        let server = HubServer(hub: FakeHub(), logger: logger, workerThreads: 1, eventLoopThreads: 1)
        let port = try server.listen(host: "127.0.0.1", port: 0)
        server.shutdown()
        return port
    }
}

/// A value shared between test threads.
final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    init(_ value: Value) { stored = value }
    var value: Value {
        get { lock.lock(); defer { lock.unlock() }; return stored }
        set { lock.lock(); stored = newValue; lock.unlock() }
    }
    func mutate(_ body: (inout Value) -> Void) {
        lock.lock(); body(&stored); lock.unlock()
    }
}

/// A blocking TCP client socket for sending raw bytes to a server.
final class RawSocket {
    private let fd: Int32

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw WeftError(errno, "socket") }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { Glibc.close(fd); throw WeftError(errno, "connect") }
    }

    deinit { Glibc.close(fd) }

    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw WeftError(errno, "send") }
            sent += n
        }
    }

    func receive(count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + received, count - received, 0) }
            guard n > 0 else { throw WeftError(n == 0 ? EPIPE : errno, "recv") }
            received += n
        }
        return bytes
    }

    /// Ends this side's stream (the peer reads end of file); answers can still be read.
    func shutdownWrite() {
        shutdown(fd, Int32(SHUT_WR))
    }

    /// True if the peer closes the stream (within the 5 s receive timeout).
    func readsEndOfStream() -> Bool {
        var byte: UInt8 = 0
        while true {
            let n = recv(fd, &byte, 1, 0)
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
    }
}
