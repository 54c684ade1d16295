#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftHub
import WeftProto

/// A power loss after the metadata journal's sync made a commit durable whose new object never
/// reached the disk (SPEC.md §5, "Objects lost with unsynced commits"), with a real chunk store:
/// the hub opens with every change, names the object, fsck reports it and `--repair` mends it.
final class HubReplayTests: XCTestCase {
    private var directories: [String] = []

    override func tearDown() {
        for directory in directories { try? FileManager.default.removeItem(atPath: directory) }
        super.tearDown()
    }

    private func newDirectory() -> String {
        let directory = NSTemporaryDirectory() + "weft-replay-test-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        directories.append(directory)
        return directory
    }

    /// A copy of the open hub's directory as a kill or a power loss leaves it: the journal synced
    /// and RocksDB idle, so that RocksDB's files hold the last checkpoint only.
    private func crashImage(of hub: Hub, at directory: String) throws -> String {
        try hub.meta.sync()
        let deadline = Date().addingTimeInterval(10)
        while hub.meta.hasBackgroundWork && Date() < deadline { usleep(10_000) }
        XCTAssertFalse(hub.meta.hasBackgroundWork, "RocksDB still busy: the copy would not be a crash image")
        let copy = newDirectory()
        try FileManager.default.copyItem(atPath: directory, toPath: copy)
        return copy
    }

    func testACommitWhoseObjectALossTookIsReportedAtOpenAndByFsckWhichRepairsIt() throws {
        let directory = newDirectory()
        try Hub.format(directory: directory, chunkSizeBytes: 1 << 20, compression: .none, force: false)
        let hub = try Hub(directory: directory, logger: testLogger("weft.hub.replay"))
        defer { try? hub.close() }
        let context = RequestContext(session: try hub.openSession(agentName: "replay").0, credentials: .root)
        let file = try hub.create(context, parent: InodeNumbers.root, name: Array("f".utf8), mode: UInt32(S_IFREG) | 0o644,
                                  rdev: 0, umask: 0, exclusive: true)
        let other = try hub.create(context, parent: InodeNumbers.root, name: Array("g".utf8), mode: UInt32(S_IFREG) | 0o644,
                                   rdev: 0, umask: 0, exclusive: true)
        func commit(_ data: [UInt8], to ino: InodeID, at offset: UInt32, durable: Bool) throws -> SliceID {
            let id = try hub.allocateSliceIDs(context, count: 1)
            try hub.writeSlice(context, id: id, data: data)
            let slice = Slice(id: id, offsetInChunk: offset, length: UInt32(data.count), objectLength: UInt32(data.count))
            _ = try hub.commitSlices(context, ino: ino, slices: [SliceCommit(chunkIndex: 0, slice: slice)],
                                     minimumSize: UInt64(offset) + UInt64(data.count), durable: durable)
            return id
        }
        let first = [UInt8](repeating: 1, count: 200_000), second = [UInt8](repeating: 2, count: 300_000)
        _ = try commit(first, to: file.ino, at: 0, durable: true)
        // Two close-style commits: their records are durable once the journal syncs, their
        // objects only once a chunk pass has synced them.
        let lost = try commit(second, to: file.ino, at: 200_000, durable: false)
        _ = try commit([UInt8](repeating: 3, count: 100_000), to: other.ino, at: 0, durable: false)
        let image = try crashImage(of: hub, at: directory)
        let control = try crashImage(of: hub, at: directory)
        let lostFile = try XCTUnwrap(HubUnderTest.chunkFile(of: lost, in: image))
        try FileManager.default.removeItem(atPath: lostFile)   // it never reached the disk

        do {
            let recovered = try Hub(directory: image, logger: testLogger("weft.hub.replay"))
            try recovered.recover()
            XCTAssertEqual(recovered.meta.objectsMissingAtOpen, [lost], "reported at open")
            let after = RequestContext(session: try recovered.openSession(agentName: "after").0, credentials: .root)
            let (attributes, chunks) = try recovered.layout(after, ino: file.ino, firstChunk: 0, count: 1)
            XCTAssertEqual(attributes.size, 500_000, "every change stays")
            XCTAssertEqual(chunks.first?.map(\.id).contains(lost), true)
            XCTAssertEqual(try recovered.layout(after, ino: other.ino, firstChunk: 0, count: 1).0.size, 100_000)
            XCTAssertErrno(ENOENT, try recovered.readSlice(after, id: lost, offset: 0, length: 100))
            XCTAssertEqual(try recovered.fsck(repair: false).problems, ["chunk \(lost) is referenced but missing"])
            let repaired = try recovered.fsck(repair: true)
            XCTAssertFalse(repaired.repaired.isEmpty)
            XCTAssertEqual(try recovered.fsck(repair: false).problems, [])
            let first = try XCTUnwrap(try recovered.layout(after, ino: file.ino, firstChunk: 0, count: 1).1.first?.first)
            XCTAssertEqual(try recovered.readSlice(after, id: first.id, offset: 0, length: 200_000), [UInt8](repeating: 1, count: 200_000))
            try recovered.close()   // a clean restart (the last reference goes at the end of this block)
        }
        let reopened = try Hub(directory: image, logger: testLogger("weft.hub.replay"))
        defer { try? reopened.close() }
        XCTAssertEqual(reopened.meta.objectsMissingAtOpen, [])
        XCTAssertEqual(try reopened.fsck(repair: false).problems, [])

        // The same image with the object on the disk replays everything.
        let whole = try Hub(directory: control, logger: testLogger("weft.hub.replay"))
        defer { try? whole.close() }
        let wholeContext = RequestContext(session: try whole.openSession(agentName: "whole").0, credentials: .root)
        XCTAssertEqual(try whole.layout(wholeContext, ino: file.ino, firstChunk: 0, count: 1).0.size, 500_000)
        XCTAssertEqual(try whole.layout(wholeContext, ino: other.ino, firstChunk: 0, count: 1).0.size, 100_000)
        XCTAssertEqual(try whole.fsck(repair: false).problems, [])
    }
}
