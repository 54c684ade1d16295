#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// The metadata half of `weft fsck` on damage written straight into RocksDB: what a repair
/// fixes, and what it leaves (`unrepairable`, which makes `weft fsck --repair` exit 1).
final class MetaCheckTests: MetaStoreTestCase {
    func testRepairFixesDanglingEntriesAndLinkCountsAndLeavesWhatItCannotFix() throws {
        let kept = try makeFile("kept")
        let doomed = try makeFile("doomed")
        let parent = try makeDirectory("parent")
        let moved = try makeDirectory("child", in: parent.ino)
        let file = try makeFile("data")
        try store.mutate { t in
            // A dangling entry: the inode is gone. A wrong link count.
            t.batch.delete(Key.inode(doomed.ino))
            var record = try t.inode(kept.ino)
            record.attributes.nlink = 7
            t.put(record)
            // A directory whose record names another parent than its entry's.
            var child = try t.inode(moved.ino)
            child.parent = root
            t.put(child)
            // A slice past the end of its 64 KiB chunk.
            t.putSlices(file.ino, 0, [Slice(id: 99, offsetInChunk: 65000, length: 1000, objectLength: 1000)])
        }
        let parentProblem = "directory \(moved.ino) records parent \(root), entry is in \(parent.ino)"
        let sliceProblem = "slice 99 of inode \(file.ino) exceeds its chunk"

        let found = try store.checkMetadata(repair: false)
        XCTAssertTrue(found.problems.contains { $0.contains("points to missing inode \(doomed.ino)") }, "\(found.problems)")
        XCTAssertTrue(found.problems.contains("inode \(kept.ino) has nlink 7, expected 1"), "\(found.problems)")
        XCTAssertEqual(found.unrepairable, [parentProblem, sliceProblem])
        XCTAssertTrue(found.problems.contains(parentProblem) && found.problems.contains(sliceProblem), "\(found.problems)")
        XCTAssertEqual(found.repaired, [])

        let repaired = try store.checkMetadata(repair: true)
        XCTAssertEqual(repaired.unrepairable, [parentProblem, sliceProblem])
        XCTAssertEqual(repaired.repaired.count, 1, "\(repaired.repaired)")

        let after = try store.checkMetadata(repair: false)
        XCTAssertEqual(after.problems, [parentProblem, sliceProblem], "only what the repair cannot fix is left")
        XCTAssertErrno(ENOENT, try lookup("doomed"))
        XCTAssertEqual(try lookup("kept").nlink, 1)

        // Only unfixable problems: the repair writes nothing and reports no fix.
        XCTAssertEqual(try store.checkMetadata(repair: true).repaired, [])
    }
}
