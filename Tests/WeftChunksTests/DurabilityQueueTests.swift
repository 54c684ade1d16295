#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftProto
import XCTest
@testable import WeftChunks

/// Sync passes (SPEC.md §3.2, Durability rule): a large pass spreads its fsyncs over several
/// threads; every descriptor is closed, and a failure anywhere fails the pass once.
final class DurabilityQueueTests: ChunkTestCase {
    private func openDescriptorCount() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
    }

    /// Files written into the store's directory, handed to `queue` as written objects.
    private func register(_ count: Int, in queue: DurabilityQueue, first: SliceID = 0) throws {
        for offset in 0..<count {
            let id = first + SliceID(offset)
            let fd = open("\(directory)/object-\(id)", O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
            XCTAssertGreaterThanOrEqual(fd, 0)
            XCTAssertEqual(write(fd, [UInt8(truncatingIfNeeded: id)], 1), 1)
            _ = queue.objectWritten(id: id, fd: fd)
        }
    }

    func testALargePassSyncsAndClosesEveryFileAndAFailureFailsItOnce() throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for index in 0..<256 {
            try FileManager.default.createDirectory(atPath: "\(directory)/\(FileIO.fanOutName(index))",
                                                    withIntermediateDirectories: true)
        }
        let root = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(root, 0)
        defer { close(root) }
        let queue = DurabilityQueue(root: root, logger: log.logger)
        let before = openDescriptorCount()

        // Enough files for every thread of a pass, and deletes in every fan-out directory.
        try register(200, in: queue)
        for id in 0..<256 as Range<SliceID> { queue.objectRemoved(id: id) }
        XCTAssertEqual(openDescriptorCount() - before, 200)
        try queue.sync()
        XCTAssertEqual(openDescriptorCount() - before, 0, "every descriptor closed")

        // One descriptor that cannot be synced (a pipe: EINVAL) among many: the pass fails
        // with EIO, logged once, and still closes everything.
        try register(100, in: queue, first: 1000)
        var pipeEnds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&pipeEnds), 0)
        close(pipeEnds[1])
        _ = queue.objectWritten(id: 5000, fd: pipeEnds[0])
        try register(100, in: queue, first: 2000)
        XCTAssertThrowsError(try queue.sync()) { error in
            XCTAssertEqual((error as? WeftError)?.errno, EIO)
        }
        XCTAssertEqual(openDescriptorCount() - before, 0, "every descriptor closed after a failed pass")
        XCTAssertEqual(log.errors.filter { $0.contains("chunk sync failed") }.count, 1, "\(log.errors)")
        try queue.sync()   // nothing pending: the next pass succeeds
    }
}
