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
