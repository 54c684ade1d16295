import XCTest
@testable import WeftVFS

final class FIFOTests: XCTestCase {
    func testFirstInFirstOutAcrossCompactions() {
        var queue = FIFO<Int>()
        XCTAssertNil(queue.popFirst())
        XCTAssertNil(queue.fromEnd(0))
        var expected = 0
        for value in 0..<5000 {
            queue.append(value)
            if value % 3 == 2 {  // pops two of every three: the front moves past the compaction point
                XCTAssertEqual(queue.popFirst(), expected)
                XCTAssertEqual(queue.popFirst(), expected + 1)
                expected += 2
            }
            XCTAssertEqual(queue.count, value + 1 - expected)
            XCTAssertEqual(queue.fromEnd(0), value)
        }
        XCTAssertEqual(queue.fromEnd(queue.count - 1), expected, "the front, counted from the end")
        XCTAssertNil(queue.fromEnd(queue.count), "past the front")
        XCTAssertNil(queue.fromEnd(-1))
        while let value = queue.popFirst() {
            XCTAssertEqual(value, expected)
            expected += 1
        }
        XCTAssertEqual(expected, 5000)
        XCTAssertEqual(queue.count, 0)
    }
}

/// Which own unlinks and renames overlapped on a same name (SPEC.md §12.6): only those need
/// every kept file marked stale.
final class NamesChangingTests: XCTestCase {
    private func key(_ name: String, in parent: UInt64 = 1) -> NameKey { NameKey(parent: parent, name: Array(name.utf8)) }

    func testOnlyChangesOfASameNameThatOverlapClash() {
        var changing = NamesChanging()
        // Different names, overlapping: no clash.
        let a = changing.begin([key("a")]), b = changing.begin([key("b")])
        XCTAssertTrue(changing.end(a, [key("a")]))
        XCTAssertTrue(changing.end(b, [key("b")]))
        // The same name in another directory is another name.
        let here = changing.begin([key("x", in: 1)]), there = changing.begin([key("x", in: 2)])
        XCTAssertTrue(changing.end(there, [key("x", in: 2)]))
        XCTAssertTrue(changing.end(here, [key("x", in: 1)]))
        // A rename of c over a while an unlink of a is under way: both clash, and so does a
        // later change of c that overlaps the rename, even after the unlink ended.
        let unlinkA = changing.begin([key("a")])
        let renameCA = changing.begin([key("c"), key("a")])
        XCTAssertFalse(changing.end(unlinkA, [key("a")]))
        let unlinkC = changing.begin([key("c")])
        XCTAssertFalse(changing.end(renameCA, [key("c"), key("a")]))
        XCTAssertFalse(changing.end(unlinkC, [key("c")]))
        // Nothing under way any more: a new change is alone; a rename of a name onto itself
        // does not clash with itself.
        let again = changing.begin([key("a")])
        XCTAssertTrue(changing.end(again, [key("a")]))
        let onto = changing.begin([key("d"), key("d")])
        XCTAssertTrue(changing.end(onto, [key("d"), key("d")]))
        XCTAssertTrue(changing.isEmpty)
    }
}
