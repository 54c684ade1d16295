#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import WeftTestSupport
import XCTest
import WeftHub
import WeftNet
import WeftProto
@testable import WeftVFS

/// File data through the agent layer (`VFS` write-back buffers, readers, block cache) over a
/// hub with 64 KiB chunks, checked byte for byte against an in-memory model. This class runs
/// against the in-process `Hub`; `RemoteVFSDataTests` runs the same tests over TCP.
class VFSDataTests: HubTestCase {
    static let chunk = 65536
    var fixture: HubUnderTest!
    private var agents: [VFS] = []
    let root = InodeNumbers.root

    override func setUpWithError() throws {
        try super.setUpWithError()
        fixture = try makeHub(chunkSizeBytes: Self.chunk, compression: .zstd)
    }

    override func tearDown() {
        for agent in agents { try? agent.shutdown() }
        agents.removeAll()
        fixture = nil
        super.tearDown()
    }

    /// A new agent (its own session) on `fixture`'s hub.
    func makeAgent(writeBufferBytes: Int? = nil, cacheBytes: Int? = nil, readaheadMaxBytes: Int? = nil,
                   keptFiles: (files: Int, layouts: Int)? = nil, on hub: HubUnderTest? = nil) throws -> VFS {
        var options = VFSOptions()
        options.agentName = "vfs-test-\(agents.count)"
        if let keptFiles { (options.keptFilesMax, options.keptLayoutsMax) = keptFiles }
        if let writeBufferBytes { options.writeBufferBytes = writeBufferBytes }
        if let cacheBytes { options.cacheBytes = cacheBytes }
        if let readaheadMaxBytes { options.readaheadMaxBytes = readaheadMaxBytes }
        let agent = try VFS(hub: (hub ?? fixture).api, options: options, logger: testLogger("weft.vfs.test"))
        agents.append(agent)
        return agent
    }

    func write(_ agent: VFS, _ handle: UInt64, at offset: Int, _ data: [UInt8]) throws {
        let written = try data.withUnsafeBytes { try agent.write(handle: handle, offset: UInt64(offset), data: $0) }
        XCTAssertEqual(written, data.count)
    }

    func read(_ agent: VFS, _ handle: UInt64, at offset: Int, _ size: Int) throws -> [UInt8] {
        try agent.read(handle: handle, offset: UInt64(offset), size: size).bytes()
    }

    /// The whole file as a fresh open on `agent` sees it.
    func contents(of ino: InodeID, via agent: VFS) throws -> [UInt8] {
        let (handle, _) = try agent.open(rootCaller, ino: ino, flags: O_RDONLY)
        defer { try? agent.release(handle: handle) }
        let size = Int(try agent.getattr(rootCaller, ino: ino).size)
        return try read(agent, handle, at: 0, size + 4096)
    }

    /// Where two byte arrays first differ, for failure messages.
    func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
        if a.count != b.count { return "length \(a.count) vs \(b.count)" }
        guard let index = zip(a, b).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset else {
            return "equal"
        }
        return "byte \(index): \(a[index]) vs \(b[index])"
    }

    /// A file `name` that `agent` wrote `data` to and closed.
    func writtenFile(_ name: String, _ data: [UInt8], by agent: VFS) throws -> InodeID {
        let (ino, handle) = try create(agent, name)
        try write(agent, handle, at: 0, data)
        try agent.release(handle: handle)
        return ino
    }

    func create(_ agent: VFS, _ name: String) throws -> (InodeID, UInt64) {
        let (attributes, handle) = try agent.create(rootCaller, parent: root, name: bytes(name), mode: regularFile | 0o644,
                                                    umask: 0, flags: O_RDWR)
        return (attributes.ino, handle)
    }

    // MARK: fixed patterns

    func testClosesReachTheHomeInTheBackgroundBeforeTheSessionEnds() throws {
        let a = try makeAgent(), b = try makeAgent()
        var opened: [(InodeID, UInt64)] = []
        for index in 0..<40 { opened.append(try create(a, "closing\(index)")) }
        // Unlinked by another agent while open here: each goes when this agent's open ends.
        for index in 0..<40 { try b.unlink(rootCaller, parent: root, name: bytes("closing\(index)")) }
        for (_, handle) in opened { try a.release(handle: handle) }
        let (closes, calls) = a.closes.drain()
        XCTAssertEqual(closes, 40)
        XCTAssertGreaterThanOrEqual(calls, 1)
        XCTAssertLessThanOrEqual(calls, 40)
        for (ino, _) in opened { XCTAssertErrno(ENOENT, try b.getattr(rootCaller, ino: ino), "inode \(ino) reclaimed") }
        // A close queued just before the agent ends is sent before its session ends.
        let (last, handle) = try create(a, "last")
        try b.unlink(rootCaller, parent: root, name: bytes("last"))
        try a.release(handle: handle)
        try a.shutdown()
        XCTAssertErrno(ENOENT, try b.getattr(rootCaller, ino: last))
        XCTAssertEqual(a.closes.drain().closes, 41)
    }

    func testSequentialWritesAcrossChunks() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "seq")
        var random = SeededRandom(seed: 1)
        let data = random.bytes(5 * Self.chunk + 1234)
        var offset = 0
        while offset < data.count {
            let piece = min(4096 + offset % 777, data.count - offset)
            try write(agent, handle, at: offset, Array(data[offset..<offset + piece]))
            offset += piece
        }
        XCTAssertEqual(try agent.getattr(rootCaller, ino: ino).size, UInt64(data.count), "own writes are visible at once")
        XCTAssertEqual(try read(agent, handle, at: 0, data.count), data)
        for (start, length) in [(0, 1), (Self.chunk - 3, 6), (2 * Self.chunk, Self.chunk), (data.count - 10, 100)] {
            XCTAssertEqual(try read(agent, handle, at: start, length), Array(data[start..<min(data.count, start + length)]))
        }
        XCTAssertEqual(try read(agent, handle, at: data.count, 10), [], "reads stop at the end of file")
        try agent.release(handle: handle)
        let other = try makeAgent()
        XCTAssertEqual(try contents(of: ino, via: other), data, "another agent sees it after close")
    }

    func testOverlappingOverwritesAndChunkBoundaries() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "overlap")
        var model = [UInt8](repeating: 0, count: 3 * Self.chunk)
        func apply(_ offset: Int, _ data: [UInt8]) throws {
            try write(agent, handle, at: offset, data)
            if offset + data.count > model.count { model += [UInt8](repeating: 0, count: offset + data.count - model.count) }
            model.replaceSubrange(offset..<offset + data.count, with: data)
        }
        try apply(0, [UInt8](repeating: 1, count: 3 * Self.chunk))
        try agent.flush(handle: handle)
        try apply(100, [UInt8](repeating: 2, count: 50))                // inside chunk 0, committed under it
        try apply(120, [UInt8](repeating: 3, count: 10))                // overlaps the buffered write
        try apply(Self.chunk - 5, [UInt8](repeating: 4, count: 10))     // straddles chunks 0 and 1
        try apply(2 * Self.chunk - 1, [5, 5])                           // straddles chunks 1 and 2
        XCTAssertEqual(try read(agent, handle, at: 0, model.count), model, "before the flush")
        try agent.fsync(handle: handle)
        try apply(90, [UInt8](repeating: 6, count: 100))                // covers two earlier slices
        try apply(0, [UInt8](repeating: 7, count: Self.chunk))          // covers all of chunk 0
        try agent.flush(handle: handle)
        try apply(Self.chunk, [UInt8](repeating: 8, count: 1))
        XCTAssertEqual(try read(agent, handle, at: 0, model.count), model)
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), model)
    }

    /// SPEC.md §7, Write-behind: full chunks upload in the background, and the commit puts them
    /// before later writes to the same chunk, so the file is as if nothing had been staged.
    func testStagedChunksCommitBeforeLaterWritesToThem() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "staged")
        var model: [UInt8] = []
        func apply(_ offset: Int, _ data: [UInt8]) throws {
            try write(agent, handle, at: offset, data)
            if offset + data.count > model.count { model += [UInt8](repeating: 0, count: offset + data.count - model.count) }
            model.replaceSubrange(offset..<offset + data.count, with: data)
        }
        try apply(0, [UInt8](repeating: 1, count: 2 * Self.chunk))           // chunks 0 and 1 staged
        let file = try XCTUnwrap(agent.files[ino])
        XCTAssertEqual(file.lock.withLock { file.staged.map(\.index) }, [0, 1], "whole chunks are staged, not committed")
        try apply(10, [UInt8](repeating: 2, count: 20))                       // buffered over staged chunk 0
        try apply(Self.chunk, [UInt8](repeating: 3, count: Self.chunk))       // chunk 1 staged a second time
        try apply(Self.chunk + 5, [4])
        XCTAssertEqual(try read(agent, handle, at: 0, model.count), model, "the writer reads its own writes")
        try agent.release(handle: handle)
        XCTAssertEqual(file.lock.withLock { file.staged.count + file.dirty.count }, 0, "the commit took everything")
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), model)
    }

    /// An application's fsync of a file gets the EIO of that file's lost data, and no other
    /// file's fsync does (SPEC.md §3.2: the agent's fsync of a file with nothing buffered is
    /// `syncFile`). Before, the session-wide sync gave the EIO to whichever file was fsynced
    /// first after the failure, and the file whose data was lost then synced clean.
    func testAnFsyncReportsItsOwnFilesLostDataAndNoOtherFiles() throws {
        // 1 MiB chunks and objects past 64 KiB: the journal carries none of them (§5, "Small
        // objects in the journal"), so sync passes do.
        let volume = try makeHub(chunkSizeBytes: 1 << 20)
        let agent = try makeAgent(on: volume)
        let (_, warm) = try create(agent, "warm")   // slice ids first (a durable change)
        try write(agent, warm, at: 0, [1])
        try agent.fsync(handle: warm)
        let (_, fine) = try create(agent, "fine")
        try write(agent, fine, at: 0, [UInt8](repeating: 7, count: 100_000))
        try agent.flush(handle: fine)   // committed, not durable
        let (lostIno, lost) = try create(agent, "lost")
        try write(agent, lost, at: 0, [UInt8](repeating: 9, count: 100_000))
        try agent.flush(handle: lost)
        let session = RequestContext(session: try volume.api.openSession(agentName: "check").0, credentials: rootCaller)
        let lostIDs = try volume.api.layout(session, ino: lostIno, firstChunk: 0, count: 1).1.flatMap { $0.map(\.id) }
        XCTAssertEqual(lostIDs.count, 1)
        let chunks = volume.hub.chunks
        chunks.testSyncFailure = { lostIDs.contains($0) ? EIO : nil }
        defer { chunks.testSyncFailure = nil }
        _ = try? chunks.sync()
        XCTAssertEqual(chunks.lostObjects(lostIDs), lostIDs)

        try agent.fsync(handle: fine)
        XCTAssertErrno(EIO, try agent.fsync(handle: lost))
        try agent.fsync(handle: lost)   // told once
        try agent.release(handle: fine)
        try agent.release(handle: lost)
        try agent.release(handle: warm)
    }

    /// A staged chunk whose object a failed sync pass took (another caller's pass) is written
    /// again: the hub refuses the commit naming it (ESTALE), the agent uploads the bytes anew,
    /// and the application's fsync succeeds with the file whole (SPEC.md §3.2, "Objects lost to
    /// a failed pass"). Before, the commit was acknowledged naming an object of unknown state.
    func testAStagedChunkLostToAFailedPassIsWrittenAgain() throws {
        let agent = try makeAgent()
        // Slice ids first: allocating them is a durable change, whose sync pass would take (and
        // sync) an object uploaded before it.
        let (_, warm) = try create(agent, "warm")
        try write(agent, warm, at: 0, [1])
        try agent.fsync(handle: warm)
        let (ino, handle) = try create(agent, "lost")
        let data = (0..<2 * Self.chunk).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        try write(agent, handle, at: 0, data)   // chunks 0 and 1 staged and uploading
        let file = try XCTUnwrap(agent.files[ino])
        let uploaded: [SliceID] = file.lock.withLock {
            file.waitForUploads()
            return file.staged.flatMap { $0.uploaded ?? [] }.map(\.slice.id)
        }
        XCTAssertEqual(uploaded.count, 2)
        let chunks = fixture.hub.chunks
        chunks.testSyncFailure = { uploaded.contains($0) ? EIO : nil }
        defer { chunks.testSyncFailure = nil }
        _ = try? chunks.sync()
        XCTAssertEqual(Set(chunks.lostObjects(uploaded)), Set(uploaded))
        try agent.fsync(handle: handle)
        let session = RequestContext(session: try fixture.api.openSession(agentName: "check").0, credentials: rootCaller)
        let named = try fixture.api.layout(session, ino: ino, firstChunk: 0, count: 2).1.flatMap { $0.map(\.id) }
        XCTAssertEqual(named.count, 2)
        XCTAssertTrue(Set(named).isDisjoint(with: uploaded), "the file names the objects written again, not the lost ones")
        try agent.fsync(handle: handle)   // nothing the session committed was lost: no EIO
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), data)
        XCTAssertTrue(eventually { chunks.lostObjects(uploaded).isEmpty }, "the lost objects were deleted")
        XCTAssertEqual(try fixture.api.fsck(repair: false).problems, [])
    }

    /// Once the hub reports uploads lost (ESTALE), every staged upload made before is written
    /// again before it is committed, also other files' whose own commit would not be refused:
    /// a data hub reports a failed pass once per session, not per object (SPEC.md §3.2).
    func testAfterALossReportEveryEarlierStagedUploadIsWrittenAgain() throws {
        let agent = try makeAgent()
        let (_, warm) = try create(agent, "warm")   // slice ids first (see above)
        try write(agent, warm, at: 0, [1])
        try agent.fsync(handle: warm)
        let chunks = fixture.hub.chunks
        func stage(_ name: String, seed: UInt64) throws -> (InodeID, UInt64, [UInt8], [SliceID]) {
            let (ino, handle) = try create(agent, name)
            var random = SeededRandom(seed: seed)
            let data = random.bytes(2 * Self.chunk)
            try write(agent, handle, at: 0, data)
            let file = try XCTUnwrap(agent.files[ino])
            let uploaded: [SliceID] = file.lock.withLock {
                file.waitForUploads()
                return file.staged.flatMap { $0.uploaded ?? [] }.map(\.slice.id)
            }
            XCTAssertEqual(uploaded.count, 2)
            return (ino, handle, data, uploaded)
        }
        let (fine, fineHandle, fineData, fineUploads) = try stage("fine", seed: 11)
        try chunks.sync()   // its objects are durable
        let (lost, lostHandle, lostData, lostUploads) = try stage("lost", seed: 12)
        chunks.testSyncFailure = { lostUploads.contains($0) ? EIO : nil }
        defer { chunks.testSyncFailure = nil }
        _ = try? chunks.sync()
        XCTAssertEqual(Set(chunks.lostObjects(lostUploads + fineUploads)), Set(lostUploads))
        try agent.fsync(handle: lostHandle)   // ESTALE at the hub, written again
        try agent.fsync(handle: fineHandle)   // not refused, yet written again
        let session = RequestContext(session: try fixture.api.openSession(agentName: "check").0, credentials: rootCaller)
        for (ino, before) in [(lost, lostUploads), (fine, fineUploads)] {
            let named = try fixture.api.layout(session, ino: ino, firstChunk: 0, count: 2).1.flatMap { $0.map(\.id) }
            XCTAssertEqual(named.count, 2)
            XCTAssertTrue(Set(named).isDisjoint(with: before), "inode \(ino) names objects uploaded after the report")
        }
        try agent.release(handle: lostHandle)
        try agent.release(handle: fineHandle)
        let reader = try makeAgent()
        XCTAssertTrue(try contents(of: lost, via: reader) == lostData)
        XCTAssertTrue(try contents(of: fine, via: reader) == fineData)
        XCTAssertEqual(try fixture.api.fsck(repair: false).problems, [])
    }

    /// A long write commits its uploaded chunks in batches, in the background, before the
    /// file's next commit and without the writer waiting for them.
    func testUploadedChunksCommitInBatchesDuringALongWrite() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "long")
        var random = SeededRandom(seed: 4)
        let data = random.bytes(6 * Self.chunk)
        try write(agent, handle, at: 0, Array(data[0..<5 * Self.chunk]))
        let file = try XCTUnwrap(agent.files[ino])
        XCTAssertTrue(eventually {
            file.lock.withLock { file.uploadsRunning == 0 && file.prefixCommit == nil && file.staged.count < VFS.stagedCommitBatch }
        }, "the uploaded chunks commit with no further write or commit of the file")
        file.lock.withLock {
            let left = file.staged.count
            XCTAssertEqual(file.attributes.size, UInt64((5 - left) * Self.chunk), "the hub has the committed ones")
            XCTAssertEqual(file.dirtyBytes, left * Self.chunk, "their buffers left the write-buffer bound")
            XCTAssertEqual(agent.budget.used, left * Self.chunk)
        }
        try write(agent, handle, at: 5 * Self.chunk, Array(data[5 * Self.chunk..<5 * Self.chunk + 10]))
        try write(agent, handle, at: 5 * Self.chunk + 10, Array(data[(5 * Self.chunk + 10)...]))
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), data)
    }

    /// An fsync that waits for a batch commit running at the hub, which takes everything the
    /// file had, makes no commit of its own (an empty one would only cost a round trip and a
    /// new data version), and the batch commit's reply is adopted.
    func testAnFsyncAfterABatchCommitThatTookEverythingCommitsNothing() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "batch")
        let hub: Hub = try XCTUnwrap(fixture.hub)
        let commits = Mutex(0)
        let held = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        hub.testBeforeCommitApply = { committed in
            guard committed == ino else { return }
            let first = commits.withLock { count in
                count += 1
                return count == 1
            }
            if first {
                held.signal()
                _ = release.wait(timeout: .now() + 30)
            }
        }
        defer {
            hub.testBeforeCommitApply = nil
            release.signal()
        }
        var random = SeededRandom(seed: 9)
        let data = random.bytes(VFS.stagedCommitBatch * Self.chunk)
        try write(agent, handle, at: 0, data)   // whole chunks: staged, uploaded, then one batch commit
        XCTAssertEqual(held.wait(timeout: .now() + 10), .success, "the batch commit reached the hub")
        let file = try XCTUnwrap(agent.files[ino])
        XCTAssertTrue(file.lock.withLock { file.prefixCommitStarted && file.dirty.isEmpty })
        let synced = DispatchSemaphore(value: 0)
        let failure = Mutex<String?>(nil)
        Thread.detachNewThread {
            do { try agent.fsync(handle: handle) } catch { failure.withLock { $0 = "\(error)" } }
            synced.signal()
        }
        XCTAssertEqual(synced.wait(timeout: .now() + 0.3), .timedOut, "the fsync waits for the batch commit")
        release.signal()
        XCTAssertEqual(synced.wait(timeout: .now() + 10), .success)
        XCTAssertNil(failure.withLock { $0 })
        XCTAssertEqual(commits.withLock { $0 }, 1, "the fsync made no commit of its own")
        XCTAssertEqual(file.lock.withLock { file.attributes.size }, UInt64(data.count), "the batch commit's reply was adopted")
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), data)
    }

    /// A commit that would wait for a batch commit whose task has not begun (the process's
    /// commit pool busy with other files' commits) takes the chunks back and commits them itself.
    func testACommitDoesNotWaitForABatchCommitStillQueuedBehindOthers() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "queued")
        let gate = DispatchSemaphore(value: 0)
        let busy = DispatchGroup()
        for _ in 0..<VFS.commitPoolThreads {
            busy.enter()
            VFS.commitPool.async { busy.leave(); gate.wait() }
        }
        var released = false
        func release() {
            guard !released else { return }
            released = true
            for _ in 0..<VFS.commitPoolThreads { gate.signal() }
        }
        defer { release() }
        XCTAssertEqual(busy.wait(timeout: .now() + 10), .success, "every commit thread is busy")
        var random = SeededRandom(seed: 11)
        let data = random.bytes(4 * Self.chunk + 10)
        try write(agent, handle, at: 0, data)
        let file = try XCTUnwrap(agent.files[ino])
        XCTAssertTrue(eventually { file.lock.withLock { file.uploadsRunning == 0 && file.prefixCommit != nil } },
                      "a batch commit waits in the pool")
        XCTAssertFalse(file.lock.withLock { file.prefixCommitStarted })
        let done = DispatchSemaphore(value: 0)
        let failure = Failures()
        Thread.detachNewThread {
            do { try agent.fsync(handle: handle) } catch { failure.add("\(error)") }
            done.signal()
        }
        let finished = done.wait(timeout: .now() + 10) == .success
        XCTAssertTrue(finished, "fsync waited for the busy commit pool")
        release()
        if !finished { _ = done.wait(timeout: .now() + 30) }
        XCTAssertEqual(failure.all, [])
        file.lock.withLock {
            XCTAssertEqual(file.staged.count + file.dirty.count, 0, "fsync committed everything")
            XCTAssertNil(file.prefixCommit)
        }
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), data)
    }

    /// A background upload that fails is done again by the commit; if that fails too, the commit
    /// fails and keeps the bytes for the next one.
    func testFailedBackgroundUploadIsRedoneByTheCommit() throws {
        let chunks = fixture.hub.chunks.directory
        let fanOuts = (0..<256).map { String(format: "%02x", $0) }
        func breakStore() throws {
            for name in fanOuts { try FileManager.default.moveItem(atPath: "\(chunks)/\(name)", toPath: "\(chunks)/\(name).away") }
        }
        func repairStore() throws {
            for name in fanOuts { try FileManager.default.moveItem(atPath: "\(chunks)/\(name).away", toPath: "\(chunks)/\(name)") }
        }
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "flaky")
        var random = SeededRandom(seed: 9)
        let data = random.bytes(Self.chunk + 100)
        try breakStore()
        try write(agent, handle, at: 0, data)
        let file = try XCTUnwrap(agent.files[ino])
        XCTAssertTrue(eventually { file.lock.withLock { file.uploadsRunning == 0 } })
        XCTAssertEqual(file.lock.withLock { file.staged.map { $0.uploaded == nil } }, [true], "the upload failed")
        XCTAssertThrowsError(try agent.flush(handle: handle), "the commit's own upload fails as well")
        try repairStore()
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), data, "nothing was lost")
    }

    func testHolesReadAsZeros() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "holes")
        try write(agent, handle, at: 10, [1, 2, 3])
        try write(agent, handle, at: 4 * Self.chunk + 7, [9])
        var expected = [UInt8](repeating: 0, count: 4 * Self.chunk + 8)
        expected.replaceSubrange(10..<13, with: [1, 2, 3])
        expected[4 * Self.chunk + 7] = 9
        XCTAssertEqual(try read(agent, handle, at: 0, expected.count + 100), expected)
        XCTAssertEqual(try read(agent, handle, at: Self.chunk + 5, 2 * Self.chunk),
                       [UInt8](repeating: 0, count: 2 * Self.chunk), "whole chunks without data")
        try agent.release(handle: handle)
        let attributes = try agent.setattr(rootCaller, ino: ino, SetAttributes(size: 6 * UInt64(Self.chunk)))
        XCTAssertEqual(attributes.size, 6 * UInt64(Self.chunk))
        expected += [UInt8](repeating: 0, count: 6 * Self.chunk - expected.count)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), expected, "growing by truncate adds zeros")
    }

    func testTruncateDownAndUpThroughAnOpenHandle() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "truncate")
        var random = SeededRandom(seed: 3)
        var model = random.bytes(3 * Self.chunk + 500)
        try write(agent, handle, at: 0, model)
        // Truncate with writes still buffered: they land first.
        let cut = Self.chunk + 1000
        XCTAssertEqual(try agent.setattr(rootCaller, ino: ino, SetAttributes(size: UInt64(cut))).size, UInt64(cut))
        model.removeSubrange(cut...)
        XCTAssertEqual(try read(agent, handle, at: 0, 4 * Self.chunk), model)
        _ = try agent.setattr(rootCaller, ino: ino, SetAttributes(size: 2 * UInt64(Self.chunk) + 10))
        model += [UInt8](repeating: 0, count: 2 * Self.chunk + 10 - model.count)
        XCTAssertEqual(try read(agent, handle, at: 0, 4 * Self.chunk), model, "the cut-off bytes do not come back")
        try write(agent, handle, at: cut - 10, [0xEE, 0xEE])
        model.replaceSubrange(cut - 10..<cut - 8, with: [0xEE, 0xEE])
        _ = try agent.setattr(rootCaller, ino: ino, SetAttributes(size: UInt64(cut - 9)))
        model.removeSubrange((cut - 9)...)
        XCTAssertEqual(try read(agent, handle, at: 0, 4 * Self.chunk), model)
        _ = try agent.setattr(rootCaller, ino: ino, SetAttributes(size: 0))
        XCTAssertEqual(try read(agent, handle, at: 0, 100), [])
        try write(agent, handle, at: 5, [1])
        XCTAssertEqual(try read(agent, handle, at: 0, 100), [0, 0, 0, 0, 0, 1])
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), [0, 0, 0, 0, 0, 1])
        XCTAssertEqual(try fixture.api.fsck(repair: false).problems, [])
    }

    func testOpenWithTruncateDropsBufferedAndCommittedData() throws {
        let agent = try makeAgent()
        let (ino, first) = try create(agent, "otrunc")
        try write(agent, first, at: 0, [UInt8](repeating: 1, count: 1000))
        let (second, _) = try agent.open(rootCaller, ino: ino, flags: O_RDWR | O_TRUNC)
        XCTAssertEqual(try read(agent, second, at: 0, 2000), [], "the earlier handle's writes happened before")
        try write(agent, second, at: 0, [2, 2])
        XCTAssertEqual(try read(agent, first, at: 0, 10), [2, 2])
        try agent.release(handle: first)
        try agent.release(handle: second)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), [2, 2])
    }

    /// The kernel lists a directory in several `readdir` calls; a directory that fits one page
    /// is read from the home once, so a rename between those calls cannot show both names (the
    /// two-hub linearizability test caught a listing with both the old and the new name: the
    /// agent had asked the home again after the first page, seed 3138).
    func testASmallDirectoryIsListedFromOneReadOfTheHome() throws {
        let agent = try makeAgent(), other = try makeAgent()
        let directory = try agent.mkdir(rootCaller, parent: root, name: bytes("snap"), mode: 0o755, umask: 0)
        _ = try agent.mknod(rootCaller, parent: directory.ino, name: bytes("a"), mode: regularFile | 0o644, rdev: 0, umask: 0)
        let handle = try agent.opendir(rootCaller, ino: directory.ino)
        defer { agent.releasedir(handle: handle) }
        let first = try agent.readdir(handle: handle, offset: 0, limit: 2)
        try other.rename(rootCaller, parent: directory.ino, name: bytes("a"), newParent: directory.ino, newName: bytes("b"),
                         flags: [])
        let rest = try agent.readdir(handle: handle, offset: first.count, limit: 100)
        XCTAssertEqual((first + rest).map(\.name), [bytes("."), bytes(".."), bytes("a")], "one instant: before the rename")
        let again = try agent.readdir(handle: handle, offset: 0, limit: 100)
        XCTAssertEqual(again.map(\.name), [bytes("."), bytes(".."), bytes("b")], "rewinddir reads the home again")
    }

    func testDirectoryListingThroughTheAgent() throws {
        let agent = try makeAgent()
        let directory = try agent.mkdir(rootCaller, parent: root, name: bytes("listing"), mode: 0o755, umask: 0)
        var expected: [[UInt8]] = []
        for index in 0..<2500 {
            let name = bytes(index % 2 == 0 ? ".e\(index)" : "-e\(index)")
            expected.append(name)
            _ = try agent.mknod(rootCaller, parent: directory.ino, name: name, mode: regularFile | 0o644, rdev: 0, umask: 0)
        }
        expected.sort { $0.lexicographicallyPrecedes($1) }
        let handle = try agent.opendir(rootCaller, ino: directory.ino)
        defer { agent.releasedir(handle: handle) }
        for pageSize in [1, 100, 5000] {
            var names: [[UInt8]] = []
            var offset = 0
            while true {
                let page = try agent.readdir(handle: handle, offset: offset, limit: pageSize)
                if page.isEmpty { break }
                names += page.map(\.name)
                offset += page.count
            }
            XCTAssertEqual(Array(names.prefix(2)), [bytes("."), bytes("..")], "page size \(pageSize)")
            XCTAssertEqual(Array(names.dropFirst(2)), expected, "page size \(pageSize): every entry once, in order")
        }
        XCTAssertErrno(ENOTDIR, try agent.opendir(rootCaller, ino: try agent.mknod(rootCaller, parent: root,
            name: bytes("plain"), mode: regularFile | 0o644, rdev: 0, umask: 0).ino))
    }

    // MARK: seeded random rounds against a model

    /// The seed of the first round; WEFT_TEST_SEED replays a failing one.
    private var baseSeed: UInt64 { UInt64(ProcessInfo.processInfo.environment["WEFT_TEST_SEED"] ?? "") ?? 20_240_601 }

    func testSeededRandomRoundsMatchTheModel() throws {
        for round in 0..<12 {
            let seed = baseSeed &+ UInt64(round)
            if let failure = try runRandomRound(seed: seed, operations: 70, on: fixture, chunk: Self.chunk) {
                return XCTFail("seed \(seed) (rerun with WEFT_TEST_SEED=\(seed)): \(failure)")
            }
        }
    }

    func testSeededRandomRoundsWithMultiBlockChunks() throws {
        // 256 KiB chunks: objects span several 64 KiB checksum/cache blocks.
        let chunk = 4 * Limits.blockSizeBytes
        let hub = try makeHub(chunkSizeBytes: chunk, compression: .none)
        for round in 0..<4 {
            let seed = baseSeed &+ 1000 &+ UInt64(round)
            if let failure = try runRandomRound(seed: seed, operations: 60, on: hub, chunk: chunk) {
                return XCTFail("seed \(seed) (rerun with WEFT_TEST_SEED=\(seed &- 1000)): \(failure)")
            }
        }
    }

    /// One file, `operations` random writes, reads, truncates, flushes and reopens, each read
    /// compared with the model. Returns a description of the first mismatch.
    private func runRandomRound(seed: UInt64, operations: Int, on hub: HubUnderTest, chunk: Int) throws -> String? {
        var random = SeededRandom(seed: seed)
        let agent = try makeAgent(writeBufferBytes: [chunk, 4 * chunk, 256 << 20].randomElement(using: &random)!,
                                  cacheBytes: [256 << 10, 64 << 20].randomElement(using: &random)!, on: hub)
        let observer = try makeAgent(on: hub)
        let (ino, created) = try create(agent, "round-\(seed)")
        var handle = created
        var model: [UInt8] = []
        let span = 5 * chunk
        var log: [String] = []
        for step in 0..<operations {
            let choice = Int.random(in: 0..<100, using: &random)
            if choice < 45 {
                let offset: Int
                switch Int.random(in: 0..<4, using: &random) {
                case 0: offset = model.count                                           // append
                case 1: offset = Int.random(in: 1...4, using: &random) * chunk - Int.random(in: 0...64, using: &random)
                default: offset = Int.random(in: 0..<span, using: &random)
                }
                let length: Int
                switch Int.random(in: 0..<3, using: &random) {
                case 0: length = Int.random(in: 1...64, using: &random)
                case 1: length = Int.random(in: 1...8192, using: &random)
                default: length = Int.random(in: 1...(2 * chunk + 100), using: &random)
                }
                // Random bytes or a run of one byte (zstd compresses the latter).
                let data = Bool.random(using: &random) ? random.bytes(length)
                    : [UInt8](repeating: UInt8.random(in: 1...255, using: &random), count: length)
                log.append("write \(offset)+\(length)")
                try write(agent, handle, at: offset, data)
                if offset > model.count { model += [UInt8](repeating: 0, count: offset - model.count) }
                let overlap = min(model.count, offset + length) - offset
                if overlap > 0 { model.replaceSubrange(offset..<offset + overlap, with: data[0..<overlap]) }
                if length > overlap { model += data[overlap...] }
            } else if choice < 70 {
                let offset = Int.random(in: 0...(model.count + 1000), using: &random)
                let size = Int.random(in: 1...(3 * chunk), using: &random)
                log.append("read \(offset)+\(size)")
                let got = try read(agent, handle, at: offset, size)
                let expected = offset < model.count ? Array(model[offset..<min(model.count, offset + size)]) : []
                if got != expected {
                    return "step \(step) \(log.last!): \(firstDifference(got, expected)); ops: \(log.suffix(12))"
                }
            } else if choice < 78 {
                let size = Int.random(in: 0...span, using: &random)
                log.append("truncate \(size)")
                let attributes = try agent.setattr(rootCaller, ino: ino, SetAttributes(size: UInt64(size)))
                if attributes.size != UInt64(size) { return "step \(step): truncate gave size \(attributes.size)" }
                if size < model.count { model.removeSubrange(size...) } else {
                    model += [UInt8](repeating: 0, count: size - model.count)
                }
            } else if choice < 84 {
                log.append("flush")
                try agent.flush(handle: handle)
            } else if choice < 88 {
                log.append("fsync")
                try agent.fsync(handle: handle)
            } else if choice < 94 {
                let truncating = Int.random(in: 0..<4, using: &random) == 0
                log.append(truncating ? "reopen O_TRUNC" : "reopen")
                try agent.release(handle: handle)
                handle = try agent.open(rootCaller, ino: ino, flags: O_RDWR | (truncating ? O_TRUNC : 0)).handle
                if truncating { model.removeAll() }
            } else {
                log.append("flush + other agent reads")
                try agent.flush(handle: handle)
                let seen = try contents(of: ino, via: observer)
                if seen != model { return "step \(step) other agent: \(firstDifference(seen, model)); ops: \(log.suffix(12))" }
            }
            let size = try agent.getattr(rootCaller, ino: ino).size
            if size != UInt64(model.count) { return "step \(step) \(log.last!): size \(size), model \(model.count)" }
        }
        let whole = try read(agent, handle, at: 0, model.count + 1)
        if whole != model { return "final read: \(firstDifference(whole, model)); ops: \(log.suffix(12))" }
        try agent.release(handle: handle)
        let seen = try contents(of: ino, via: try makeAgent(on: hub))
        if seen != model { return "fresh agent: \(firstDifference(seen, model)); ops: \(log.suffix(12))" }
        return nil
    }

    // MARK: write-back bound

    func testWriteBufferBoundIsRespected() throws {
        let agent = try makeAgent(writeBufferBytes: 16 * 1024)
        XCTAssertEqual(agent.budget.limitBytes, Self.chunk, "the bound is at least one chunk")
        var random = SeededRandom(seed: 42)
        var files: [(ino: InodeID, handle: UInt64, model: [UInt8])] = []
        for index in 0..<3 {
            let (ino, handle) = try create(agent, "bounded-\(index)")
            files.append((ino, handle, []))
        }
        var peak = 0
        for step in 0..<1500 {
            let which = Int.random(in: 0..<files.count, using: &random)
            let length = Int.random(in: 1...6000, using: &random)
            let offset = Bool.random(using: &random) ? files[which].model.count
                : Int.random(in: 0..<(1 << 20), using: &random)
            let data = random.bytes(length)
            try write(agent, files[which].handle, at: offset, data)
            var model = files[which].model
            if offset + length > model.count { model += [UInt8](repeating: 0, count: offset + length - model.count) }
            model.replaceSubrange(offset..<offset + length, with: data)
            files[which].model = model
            peak = max(peak, agent.budget.used)
            if agent.budget.used > agent.budget.limitBytes {
                return XCTFail("step \(step): \(agent.budget.used) bytes buffered, bound \(agent.budget.limitBytes)")
            }
        }
        XCTAssertGreaterThan(peak, agent.budget.limitBytes / 2, "the test did fill the buffer")
        for file in files {
            XCTAssertEqual(try read(agent, file.handle, at: 0, file.model.count + 10), file.model)
            try agent.release(handle: file.handle)
            XCTAssertEqual(try contents(of: file.ino, via: try makeAgent()), file.model)
        }
        XCTAssertEqual(agent.budget.used, 0)
    }

    /// A write whose data comes piece by piece (the FUSE adapter reads it from the pipe the
    /// kernel spliced it into): a source that fails at once fails the write with nothing
    /// buffered; one that fails after a piece makes a short write of the pieces before, which
    /// stay written; the rest of the budget is given back either way.
    func testAWriteWhoseDataCannotBeReadIsShortOrFailsAndKeepsNothingElse() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "spliced")
        var random = SeededRandom(seed: 77)
        let data = random.bytes(Self.chunk + 1000)    // two pieces: the first chunk, then 1,000 bytes
        var pieces = 0
        let idleBefore = agent.pool.idleCount
        XCTAssertThrowsError(try agent.write(handle: handle, offset: 0, count: data.count) { _ in
            pieces += 1
            throw WeftError(EIO, "pipe")
        }) { XCTAssertEqual(($0 as? WeftError)?.errno, EIO) }
        XCTAssertEqual(pieces, 1)
        XCTAssertGreaterThanOrEqual(agent.pool.idleCount, max(1, idleBefore),
                                    "the pooled chunk buffer the failed piece took went back")
        XCTAssertEqual(agent.budget.used, 0)
        XCTAssertEqual(try agent.getattr(rootCaller, ino: ino).size, 0)

        var from = 0
        let written = try agent.write(handle: handle, offset: 0, count: data.count) { piece in
            if from > 0 { throw WeftError(EIO, "pipe") }
            piece.copyBytes(from: data[0..<piece.count])
            from += piece.count
        }
        XCTAssertEqual(written, Self.chunk, "a short write of the first piece")
        XCTAssertLessThanOrEqual(agent.budget.used, Self.chunk)
        XCTAssertEqual(try agent.getattr(rootCaller, ino: ino).size, UInt64(Self.chunk))
        try agent.fsync(handle: handle)
        XCTAssertEqual(agent.budget.used, 0)
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), Array(data[0..<Self.chunk]))
    }

    // MARK: read-ahead

    /// A whole small file read at once (a dataset sample) schedules no read-ahead: there is
    /// nothing past its end. Each step used to wake a pool thread per file for an empty range.
    func testReadingASmallFileWholeSchedulesNoReadahead() throws {
        let agent = try makeAgent()
        var random = SeededRandom(seed: 5)
        let data = random.bytes(4096)
        let ino = try writtenFile("sample", data, by: agent)
        let reader = try makeAgent()
        XCTAssertEqual(try contents(of: ino, via: reader), data)
        XCTAssertEqual(reader.readaheadSteps.load(ordering: .relaxed), 0)

        // A file larger than what is read does get read-ahead, up to its end.
        let (big, bigHandle) = try create(agent, "larger")
        try write(agent, bigHandle, at: 0, random.bytes(3 * Self.chunk))
        try agent.release(handle: bigHandle)
        let (readHandle, _) = try reader.open(rootCaller, ino: big, flags: O_RDONLY)
        defer { try? reader.release(handle: readHandle) }
        _ = try read(reader, readHandle, at: 0, 4096)
        XCTAssertEqual(reader.readaheadSteps.load(ordering: .relaxed), 1)
    }

    /// Read-ahead stops at the file's end but still fetches a last stretch shorter than its
    /// usual step (half a chunk): here the end of the file is an object of its own, a quarter
    /// of a chunk long, that only read-ahead can fetch before the reader gets there.
    func testReadaheadFetchesTheFilesLastShortStretch() throws {
        let chunk = Self.chunk
        let agent = try makeAgent(readaheadMaxBytes: chunk)
        let (ino, handle) = try create(agent, "tail")
        var random = SeededRandom(seed: 6)
        let data = random.bytes(3 * chunk)
        try write(agent, handle, at: 0, Array(data[0..<(2 * chunk + 3 * chunk / 4)]))
        try agent.fsync(handle: handle)
        try write(agent, handle, at: 2 * chunk + 3 * chunk / 4, Array(data[(2 * chunk + 3 * chunk / 4)...]))
        try agent.release(handle: handle)

        let reader = try makeAgent(readaheadMaxBytes: chunk)
        let (readHandle, _) = try reader.open(rootCaller, ino: ino, flags: O_RDONLY)
        defer { try? reader.release(handle: readHandle) }
        // Quarter-chunk reads up to a quarter into the last chunk: the reader never touches
        // the tail object, which starts at 2¾ chunks.
        for offset in stride(from: 0, to: 2 * chunk + chunk / 4, by: chunk / 4) {
            XCTAssertEqual(try read(reader, readHandle, at: offset, chunk / 4), Array(data[offset..<(offset + chunk / 4)]))
        }
        let deadline = Date().addingTimeInterval(10)
        while reader.cache.usedBytes < data.count, Date() < deadline { usleep(2_000) }
        XCTAssertEqual(reader.cache.usedBytes, data.count, "read-ahead fetched the last quarter chunk too")
        XCTAssertEqual(try read(reader, readHandle, at: 2 * chunk + chunk / 4, chunk), Array(data[(2 * chunk + chunk / 4)...]))
    }

    // MARK: open with layout

    /// A reading open brings the file's first chunk lists (`openLayout`), kept under the open's
    /// lease, so the first read asks the hub only for data; a change by another agent still
    /// recalls them.
    func testAnOpenBringsTheFirstChunkListsAndAChangeStillRecallsThem() throws {
        let chunk = Self.chunk
        let writer = try makeAgent()
        var random = SeededRandom(seed: 8)
        let data = random.bytes(2 * chunk + 100)
        let ino = try writtenFile("sample", data, by: writer)

        let reader = try makeAgent()
        let (readHandle, _) = try reader.open(rootCaller, ino: ino, flags: O_RDONLY)
        let file = try XCTUnwrap(reader.openFile(ino))
        let kept = file.lock.withLock { (0..<3).map { file.layouts[UInt32($0)] } }
        let (_, expected) = try fixture.api.layout(RequestContext(session: reader.session, credentials: rootCaller),
                                                   ino: ino, firstChunk: 0, count: 3)
        XCTAssertEqual(kept, expected.map { Optional($0) }, "the open brought chunks 0-2")
        XCTAssertTrue(file.isFresh)
        XCTAssertEqual(try read(reader, readHandle, at: 0, data.count + 10), data)

        // Another agent's change recalls the lists; the reader reads the new bytes.
        let (writerHandle, _) = try writer.open(rootCaller, ino: ino, flags: O_RDWR)
        let patch = random.bytes(300)
        try write(writer, writerHandle, at: chunk - 100, patch)
        try writer.fsync(handle: writerHandle)
        var changed = data
        changed.replaceSubrange((chunk - 100)..<(chunk + 200), with: patch)
        XCTAssertEqual(try read(reader, readHandle, at: 0, data.count), changed)
        try writer.release(handle: writerHandle)
        try reader.release(handle: readHandle)

        // A writing open brings no lists (it would not read them).
        let (writeOnly, _) = try reader.open(rootCaller, ino: ino, flags: O_WRONLY)
        defer { try? reader.release(handle: writeOnly) }
        let other = try makeAgent()
        let (otherHandle, _) = try other.open(rootCaller, ino: ino, flags: O_WRONLY)
        defer { try? other.release(handle: otherHandle) }
        let otherFile = try XCTUnwrap(other.openFile(ino))
        XCTAssertEqual(otherFile.lock.withLock { otherFile.layouts.count }, 0)
    }

    /// This agent's own unlink, link or rename of a file recalls nothing of its own, but a reply
    /// about the file to a call under way (an open of it not known yet) must not be cached:
    /// the lease cache marks the inode as a recall would.
    func testOwnLinkChangesMakeRepliesUnderWayUncacheable() throws {
        let agent = try makeAgent()
        let (unlinked, h1) = try create(agent, "unlinked")
        let (linked, h2) = try create(agent, "linked")
        let (untouched, h3) = try create(agent, "untouched")
        for handle in [h1, h2, h3] { try agent.release(handle: handle) }
        let token = agent.leaseCache.token()
        try agent.unlink(rootCaller, parent: root, name: bytes("unlinked"))
        _ = try agent.link(rootCaller, ino: linked, newParent: root, newName: bytes("linked-2"))
        XCTAssertFalse(agent.leaseCache.mayCache(agent.kernelIno(unlinked), since: token))
        XCTAssertFalse(agent.leaseCache.mayCache(agent.kernelIno(linked), since: token))
        XCTAssertTrue(agent.leaseCache.mayCache(agent.kernelIno(untouched), since: token))
        XCTAssertEqual(agent.leaseCache.recallCount, 0, "not counted as recalls")
    }

    /// A small file's bytes come with its open (`openLayout`): cached before the first read,
    /// which then asks the hub for nothing.
    func testASmallFilesBytesComeWithItsOpen() throws {
        let writer = try makeAgent()
        var random = SeededRandom(seed: 9)
        let data = random.bytes(5000)
        let ino = try writtenFile("sample", data, by: writer)

        let reader = try makeAgent()
        let (_, lists) = try fixture.api.layout(RequestContext(session: reader.session, credentials: rootCaller),
                                                ino: ino, firstChunk: 0, count: 1)
        let object = try XCTUnwrap(lists.first?.first)
        let key = BlockCache.Key(object: object.id, block: 0)
        XCTAssertNil(reader.cache.get(key))
        let (readHandle, _) = try reader.open(rootCaller, ino: ino, flags: O_RDONLY)
        defer { try? reader.release(handle: readHandle) }
        XCTAssertEqual(reader.cache.get(key)?.length, data.count, "cached by the open")
        XCTAssertEqual(try read(reader, readHandle, at: 0, 8192), data)
    }

    // MARK: cache drop

    func testDroppedCacheRefillsFromTheHub() throws {
        let agent = try makeAgent(readaheadMaxBytes: 0)
        let (ino, handle) = try create(agent, "dropped")
        var random = SeededRandom(seed: 77)
        let data = random.bytes(5 * Self.chunk + 1234)
        try write(agent, handle, at: 0, data)
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: agent), data)
        let cached = agent.cache.usedBytes
        XCTAssertGreaterThanOrEqual(cached, data.count, "the read filled the cache")
        XCTAssertEqual(agent.dropCachedData(), cached)
        XCTAssertEqual(agent.cache.usedBytes, 0)
        XCTAssertNil(agent.cache.get(BlockCache.Key(object: 1, block: 0)))
        XCTAssertEqual(try contents(of: ino, via: agent), data, "read again from the hub")
        XCTAssertEqual(agent.cache.usedBytes, cached, "and cached again")
        XCTAssertEqual(agent.dropCachedData(), cached)
        XCTAssertEqual(agent.dropCachedData(), 0, "nothing left to drop")
    }


    /// Readers of overlapping stretches of cold data (multi-block objects, read-ahead on) share
    /// fetches: every read returns the right bytes, and all of them finish (a cycle of waits
    /// would hang them past the deadline).
    func testConcurrentOverlappingReadsOfColdDataAgree() throws {
        let hub = try makeHub(chunkSizeBytes: 1 << 20, compression: .none)
        let writer = try makeAgent(on: hub)
        let (ino, handle) = try create(writer, "shared")
        var random = SeededRandom(seed: 4242)
        let data = random.bytes(4 << 20 + 12345)
        try write(writer, handle, at: 0, data)
        try writer.release(handle: handle)
        let agent = try makeAgent(cacheBytes: 64 << 20, on: hub)
        for round in 0..<3 {
            XCTAssertGreaterThanOrEqual(agent.dropCachedData(), 0)
            let failures = Failures()
            let group = DispatchGroup()
            for reader in 0..<8 {
                group.enter()
                Thread.detachNewThread {
                    defer { group.leave() }
                    var random = SeededRandom(seed: UInt64(round * 100 + reader))
                    do {
                        let (handle, _) = try agent.open(rootCaller, ino: ino, flags: O_RDONLY)
                        defer { try? agent.release(handle: handle) }
                        // Half the readers go sequentially (read-ahead, whole-object fetches),
                        // the others jump around in overlapping stretches.
                        var offset = reader % 2 == 0 ? Int(random.next() % 65536) : 0
                        for _ in 0..<24 {
                            if reader % 2 == 0 { offset = Int(random.next() % UInt64(data.count)) }
                            let size = 1 + Int(random.next() % UInt64(3 * Limits.blockSizeBytes + 777))
                            let got = try agent.read(handle: handle, offset: UInt64(offset), size: size).bytes()
                            let expected = Array(data[min(offset, data.count)..<min(offset + size, data.count)])
                            if got != expected { failures.add("round \(round) reader \(reader) at \(offset)+\(size)") }
                            offset = (offset + size) % data.count
                        }
                    } catch {
                        failures.add("round \(round) reader \(reader): \(error)")
                    }
                }
            }
            XCTAssertEqual(group.wait(timeout: .now() + 60), .success, "readers stuck in round \(round)")
            XCTAssertEqual(failures.all, [])
        }
        XCTAssertEqual(try contents(of: ino, via: agent), data)
    }

    /// What reader threads report, collected under a lock.
    private final class Failures: @unchecked Sendable {
        private let lock = NSLock()
        private var list: [String] = []
        func add(_ text: String) { lock.withLock { list.append(text) } }
        var all: [String] { lock.withLock { list } }
    }

    func testReadsSurviveBackgroundCompaction() throws {
        // Seventeen separate slices in one chunk make the hub compact it into one object and
        // delete the seventeen. Maintenance starts only at `recover()`, so the agent caches the
        // chunk's layout deterministically before the compaction runs.
        // BUG (Sources/WeftHub/Maintenance.swift `compact` + `collectGarbage`, with
        // Sources/WeftMeta/MetaStore+Data.swift `replaceSlices`, against the layout cache in
        // Sources/WeftVFS/Reader.swift `layoutLocked`): compaction swaps the slice list without
        // changing the file's dataVersion, and garbage collection deletes the old objects at once,
        // so an agent holding the old layout (valid by dataVersion) reads a deleted object:
        // VFS.read throws ENOENT for a file nobody changed. In normal operation maintenance runs
        // all the time, so any read that fetches a layout just before a compaction hits this.
        let hub = try makeHub(chunkSizeBytes: Self.chunk, compression: .none, recover: false)
        // No read-ahead, so that only the bytes read are fetched (and cached).
        let agent = try makeAgent(readaheadMaxBytes: 0, on: hub)
        let (ino, handle) = try create(agent, "compacted")
        var model = [UInt8](repeating: 0, count: 16 * 1000 + 10)
        for index in 0..<17 {
            let data = [UInt8](repeating: UInt8(index + 1), count: 10)
            try write(agent, handle, at: index * 1000, data)
            model.replaceSubrange(index * 1000..<index * 1000 + 10, with: data)
        }
        XCTAssertEqual(try read(agent, handle, at: 1000, 10), Array(model[1000..<1010]))
        XCTAssertEqual(try hub.api.layout(RequestContext(session: agent.session, credentials: rootCaller), ino: ino,
                                          firstChunk: 0, count: 1).1[0].count, 17)
        try hub.hub.recover()
        XCTAssertTrue(try eventually { try hub.api.status().chunks == 1 }, "compacted and collected")
        XCTAssertEqual(try hub.api.layout(RequestContext(session: agent.session, credentials: rootCaller), ino: ino,
                                          firstChunk: 0, count: 1).1[0].count, 1)
        XCTAssertEqual(try read(agent, handle, at: 5000, 10), Array(model[5000..<5010]))
        XCTAssertEqual(try read(agent, handle, at: 0, model.count), model)
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent(on: hub)), model)
    }
}

/// Every `VFSDataTests` test again with the agents on `RemoteHub` over TCP, plus agents on
/// different transports sharing one volume.
final class RemoteVFSDataTests: VFSDataTests {
    override class var transport: HubTransport { .tcp }

    /// SPEC.md §4, Compressed uploads: on this zstd volume the agent's objects that shrink go to
    /// the hub as compressed images, and every byte reads back the same, also in-process.
    func testAnAgentUploadsDataThatShrinksCompressed() throws {
        let client = try XCTUnwrap(fixture.api as? RemoteHub)
        let before = client.compressedUploads
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "checkpoint")
        let data = (0..<(3 * Self.chunk + 500)).map { UInt8(truncatingIfNeeded: ($0 / 5) &* 3) }
        try write(agent, handle, at: 0, data)
        try agent.fsync(handle: handle)
        try agent.release(handle: handle)
        let after = client.compressedUploads
        XCTAssertEqual(after.objects - before.objects, 4, "one object per chunk")
        XCTAssertEqual(after.rawBytes - before.rawBytes, data.count)
        XCTAssertLessThan(after.imageBytes - before.imageBytes, data.count / 4)
        XCTAssertLessThan(try fixture.api.status().storedBytes, UInt64(data.count / 4))
        var options = VFSOptions()
        options.agentName = "embedded"
        let embeddedAgent = try VFS(hub: fixture.hub, options: options, logger: testLogger("weft.vfs.embedded"))
        defer { try? embeddedAgent.shutdown() }
        XCTAssertEqual(try contents(of: ino, via: embeddedAgent), data)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), data)
        XCTAssertEqual(try fixture.api.fsck(repair: false).problems, [])
    }

    func testAgentsOnBothTransportsShareData() throws {
        let remoteAgent = try makeAgent()
        var options = VFSOptions()
        options.agentName = "embedded"
        let embeddedAgent = try VFS(hub: fixture.hub, options: options, logger: testLogger("weft.vfs.embedded"))
        defer { try? embeddedAgent.shutdown() }
        let (ino, handle) = try create(remoteAgent, "shared")
        var random = SeededRandom(seed: 8)
        let data = random.bytes(2 * Self.chunk + 77)
        try write(remoteAgent, handle, at: 0, data)
        try remoteAgent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: embeddedAgent), data, "close-to-open across transports")
        let (embeddedHandle, _) = try embeddedAgent.open(rootCaller, ino: ino, flags: O_RDWR)
        try write(embeddedAgent, embeddedHandle, at: Self.chunk - 1, [1, 2, 3])
        try embeddedAgent.release(handle: embeddedHandle)
        var expected = data
        expected.replaceSubrange(Self.chunk - 1..<Self.chunk + 2, with: [1, 2, 3])
        XCTAssertEqual(try contents(of: ino, via: remoteAgent), expected)
    }
}
